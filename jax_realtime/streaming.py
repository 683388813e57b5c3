"""Streaming policy for one utterance: which audio to decode next, and which text is stable.

Pure code: no JAX, no asyncio.  The caller feeds audio, asks for the next window to decode,
hands back the engine's result, and gets the newly stable text (a delta).

The policy (LocalAgreement on tokens, after Macháček et al., "Turning Whisper into Real-Time
Transcription System", 2023, with Whisper's own seek rule for moving the window):

* The *window* is the utterance's audio from ``window_start`` on, at most ``max_window_s``.
  After every step of new audio it is decoded again in timestamp mode, conditioned on the text
  before the window (the prompt) and *continuing* the window's committed output (a forced prefix,
  its timestamps included): committed text is never decoded twice and never revised.
* New text is *committed* (sent as a delta) once ``agreement`` consecutive hypotheses agree on
  it: the longest common prefix of their text tokens, less the last ``holdback_tokens`` of the
  newest hypothesis (the words at the edge of the audio, which the next step often revises).
  A hypothesis that closes its last segment well before the end of the audio (Whisper heard the
  speech end) is committed whole.  Tokens are compared, text is emitted: a delta is the new part
  of the decoded committed text, held back while it ends inside a multi-byte character.

Moving the window.  Audio leaves the window only through :meth:`Utterance._cut`, and only where
a hypothesis says that the text before that point covers it:

* at the end of a segment (a timestamp after text) inside the committed output, once the window
  is longer than ``trim_after_s``;
* at the end of a complete segment of a *fresh* decode (no prompt, no prefix: Whisper segments the
  window afresh, as its seek loop does), when the committed output holds no segment end of its
  own.  The fresh text is aligned with the committed text; a complete fresh segment that goes on
  past the committed text is committed too (Whisper's seek loop treats complete segments as final);
* as silence, when the window decodes to nothing both with the prompt and afresh (Whisper's
  no-speech rule, twice); the last ``silence_keep_s`` stay (speech may be starting).

A decode Whisper would reject (silence: no-speech probability above 0.6 with an average
log-probability below -1; repetition: compression ratio above 2.4), or one that jumps over speech
(a segment spanning more of the VAD's speech than its text can say, see ``_skips``), is never a
reason to drop audio:
the window is decoded again, afresh, then afresh at a higher temperature, before the best attempt
is taken.  When the window reaches ``max_window_s`` without a cut, the hypothesis is committed up to
its last segment end and the window cut there; a full window without any segment end is decoded
afresh (the only decode that reliably places timestamps), and only if that fails too is the whole
window taken as covered by its text (counted as ``forced``).

Every stretch of audio that leaves the window is recorded in :attr:`Utterance.stretches` with the
number of committed text tokens that cover it and why it left; together the stretches cover the
utterance's audio from its first to its last sample (the invariant the tests check).  Stretches
that produced no text are what the service logs and counts.

After ``finish()`` the remaining audio is decoded and everything is committed; ``text`` is then
exactly the concatenation of all deltas.  ``partial`` is the newest hypothesis's text beyond the
committed text (the held-back or not yet agreed tail): what a display may show as pending.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable
from typing import Protocol, Sequence

import numpy as np

from .audio import CHUNK_LENGTH, SAMPLE_RATE, TIME_PRECISION
from .config import StreamConfig
from .decoding import too_dense

SAMPLES_PER_TIMESTAMP = round(TIME_PRECISION * SAMPLE_RATE)  # 320 samples = 0.02 s
MIN_WORD_AUDIO = round(0.1 * SAMPLE_RATE)  # the least audio CommittedWords aligns text in
ANCHOR_TOKENS = 2  # committed text tokens that must follow a cut (see Utterance._cut_points)
MAX_PROMPT_TOKENS = 223  # Whisper's longest previous-text prompt (n_text_ctx // 2 - 1)
FALLBACK_TEMPERATURE = 0.5
# The VAD may hear speech this long after the end Whisper gives its text (timestamps are coarse, the
# VAD's frames run on): later speech is speech Whisper did not transcribe.
END_TOLERANCE = round(0.5 * SAMPLE_RATE)
OVERRUN_S = 1.0  # a timestamp this far past the end of the window's audio marks made-up text
# A segment's text says at most this much of the VAD's speech per text token, plus the slack (see
# Utterance._skips).  Measured: Whisper's segments of every English clip of the eval set, decoded
# offline, levelled, hold at most 0.45 s of speech per token (median 0.25 s; scratch voicedrate.py).
SPEECH_PER_TOKEN_S = 0.75
SKIP_SLACK_S = 1.0


class TokenText(Protocol):
    """What the policy needs of a tokenizer (``tokenizer.WhisperTokenizer`` provides it)."""

    eot: int
    timestamp_begin: int

    def decode(self, ids: Sequence[int]) -> str: ...


class WindowResult(Protocol):
    """What the policy reads from an engine result (``engine.DecodeResult`` provides it)."""

    tokens: list[int]  # the whole output: the forced prefix, then what was sampled
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Window:
    """A request to decode ``audio`` after ``prompt`` (previous text), continuing ``prefix``."""

    audio: np.ndarray
    prompt: list[int]
    prefix: list[int]
    start_s: float  # where the window starts in the utterance
    end_sample: int  # utterance sample index at which the window ends
    fresh: bool = False  # decoded afresh (no prompt, no prefix): Whisper segments the window itself
    max_new_tokens: int | None = None  # what this decode may add
    temperature: float = 0.0


@dataclasses.dataclass(frozen=True)
class Stretch:
    """Audio that left the window: ``[start_s, end_s)`` of the utterance, covered by ``tokens``
    committed text tokens; ``reason``: ``text`` (cut at a segment end after committed text),
    ``silence`` (decoded to nothing, with and without the prompt), ``forced`` (a full window
    without any segment end, taken whole), ``end`` (the utterance's last window)."""

    start_s: float
    end_s: float
    tokens: int
    reason: str

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Utterance:
    """The streaming state of one utterance."""

    def __init__(self, settings: StreamConfig, tokenizer: TokenText, initial_prompt: Sequence[int] = (),
                 word_timestamps: bool = False):
        self.settings = settings
        self._tok = tokenizer
        self._audio = AudioBuffer()  # audio from the window's start to the newest sample
        self._voiced = AudioBuffer()  # per sample of the window: 1 speech (or not yet heard by the VAD), 0 not
        self._vad_used = False  # a VAD marks speech
        self._vad_frame = 0  # its frame, in samples
        self._vad_at = 0  # utterance samples handed to the VAD
        self._framed_at = 0  # utterance samples the VAD has given its verdict on
        self._last_speech = 0  # end of the last frame the VAD heard speech in
        self._window_start = 0  # utterance sample index of _audio[0]
        self._decoded_until = 0  # utterance sample index the last requested window reached
        self._user_prompt = list(initial_prompt)  # the session's prompt: conditions every decode
        self._prompt: list[int] = []  # committed text before the window
        self._committed: list[int] = []  # the window's committed output, timestamps included
        self._history: list[list[int]] = []  # latest hypotheses' continuations of _committed
        self._rejected = 0  # consecutive decodes of this window Whisper would reject (silent, repetitive)
        self._fresh_after = 0  # utterance sample index before which no fresh decode is tried
        self._regular_next = False  # a fresh decode found no cut: the next one continues the text
        self._fresh_for_full = False  # a continuation of the full window cut nothing: the next is fresh
        self._pieces: dict[int, str] = {}
        self.tokens: list[int] = []  # every committed text token of the utterance
        self.text = ""  # the concatenation of every delta returned
        self._sent_tokens = 0  # tokens whose text went out in deltas
        self._sent_raw = ""  # their text, before the first delta's leading space is stripped
        self._pending: list[int] = []  # the newest hypothesis's text tokens beyond the committed ones
        self.stretches: list[Stretch] = []  # audio that left the window, in order (see the module doc)
        self.finishing = False
        self.done = False
        self.decodes = 0
        self.fresh_decodes = 0
        self.last_prompt_tokens = 0
        # word timestamps of the committed text (opt-in): it keeps the audio they are aligned in
        self.words = CommittedWords(self) if word_timestamps else None

    # -- audio ---------------------------------------------------------------------------------
    @property
    def received_samples(self) -> int:
        return self._window_start + len(self._audio)

    @property
    def pending_samples(self) -> int:
        """Audio received but not yet part of any decoded window."""
        return self.received_samples - self._decoded_until

    @property
    def window_samples(self) -> int:
        return len(self._audio)

    @property
    def window_start_sample(self) -> int:
        """Utterance sample index where the window starts (audio before it has left)."""
        return self._window_start

    @property
    def decoded_samples(self) -> int:
        """Utterance sample index the last decoded window reached: committed text lies before it."""
        return self._decoded_until

    def text_of(self, tokens: Sequence[int]) -> str:
        """The text of some of this utterance's tokens."""
        return self._tok.decode(tokens)

    def add_audio(self, samples: np.ndarray) -> None:
        if self.finishing:
            raise RuntimeError("the utterance is finishing: no more audio")
        self._audio.append(samples)
        self._voiced.append(np.ones(len(samples), np.float32))  # speech until the VAD says otherwise
        if self.words is not None:
            self.words.add_audio(samples)

    def drop_pending(self) -> int:
        """Forget audio not yet part of any decoded window (``input_audio_buffer.clear``)."""
        dropped = max(0, min(self.pending_samples, len(self._audio)))
        self._audio.drop_back(dropped)
        self._voiced.drop_back(dropped)
        self._vad_at = min(self._vad_at, self.received_samples)
        self._framed_at = min(self._framed_at, self.received_samples)  # new audio there is not framed yet
        if self.words is not None:
            self.words.drop_back(dropped)
        return dropped

    # -- voice activity (optional: a session with a VAD feeds it) --------------------------------
    def vad_input(self) -> tuple[int, np.ndarray]:
        """The audio the VAD has not seen yet: (its first utterance sample, the samples)."""
        start = max(self._vad_at, self._window_start)
        samples = self._audio.slice(start - self._window_start, len(self._audio))
        self._vad_at = self.received_samples
        return start, samples

    def mark_speech(self, start: int, frame: int, voiced: np.ndarray) -> None:
        """The VAD's verdict on consecutive frames of ``frame`` samples from utterance sample
        ``start``.  With speech marked, audio that holds none needs no decode (see :meth:`wants_decode`)."""
        self._vad_used = True
        self._vad_frame = frame
        for k, speech in enumerate(np.asarray(voiced, bool)):
            a, b = start + k * frame, start + (k + 1) * frame
            self._voiced.fill(a - self._window_start, b - self._window_start, 1.0 if speech else 0.0)
            if speech:
                self._last_speech = b
        self._framed_at = max(self._framed_at, start + len(voiced) * frame)

    def _silent(self, a: int, b: int) -> bool:
        """Whether the VAD heard no speech in utterance samples ``[a, b)`` (only audio it framed counts)."""
        b = min(b, self._framed_at)
        if not self._vad_used or b <= a:
            return False
        return not self._voiced.max(a - self._window_start, b - self._window_start)

    def _committed_end(self) -> int | None:
        """Window sample where the committed text ends, when its last segment is closed (0 without
        committed text; None while it is open)."""
        if not self._text(self._committed):
            return 0
        ends = self._cut_points(len(self._audio), anchored=False)
        if not ends or self._text(self._committed[ends[-1]:]):
            return None
        return self._samples_at(self._committed[ends[-1]])

    def _settled(self) -> bool:
        """Nothing waits to be committed, and the VAD hears no speech after the committed text's end:
        the window's text is complete (see :meth:`_skip_silence`)."""
        end = self._committed_end()
        return (end is not None and not self._pending and not self._rejected
                and self._silent(self._window_start + end + END_TOLERANCE, self.received_samples))

    def _skip_silence(self) -> bool:
        """The new audio holds no speech (the VAD's word) and the window's text is settled: no decode
        is needed.  The silence leaves the window instead (with the committed text before it; the last
        ``silence_keep_s`` stay, speech may be starting) and counts as decoded."""
        if not self._silent(self._decoded_until, self.received_samples) or not self._settled():
            return False
        end = self._committed_end()
        if end:
            self._cut(len(self._committed), end, "text")
        keep = round(self.settings.silence_keep_s * SAMPLE_RATE)
        self._cut(len(self._committed), len(self._audio) - keep, "silence")
        self._decoded_until = self.received_samples
        return True

    def _finish_in_silence(self) -> bool:
        """Finishing, with the window's text settled and no speech after it that the VAD heard (it
        heard all the audio but its last partial frame): the utterance ends without another decode,
        the rest leaving as silence.  (Decoding silence only invites Whisper's "you".)"""
        if not self._vad_used or self.received_samples - self._framed_at >= self._vad_frame or not self._settled():
            return False
        end = self._committed_end()
        if end:
            self._cut(len(self._committed), end, "text")
        self._end("silence")
        return True

    def finish(self) -> None:
        self.finishing = True
        if len(self._audio) == 0:  # nothing left to decode
            self.done = True

    # -- scheduling ----------------------------------------------------------------------------
    @property
    def _max_samples(self) -> int:
        return round(self.settings.max_window_s * SAMPLE_RATE)

    def wants_decode(self, min_new_s: float | None = None) -> bool:
        """Whether a decode is due: the utterance is finishing, or at least ``min_new_s`` (default
        ``step_s``) of audio arrived since the last window was taken, or the window is full (a
        session behind its audio steps at once) — unless the VAD heard no speech in the new audio
        and nothing waits to be committed (the silence then leaves the window without a decode)."""
        if self.done:
            return False
        if self.finishing:
            return not self._finish_in_silence()
        min_new = self.settings.step_s if min_new_s is None else min_new_s
        due = len(self._audio) > 0 and (self.pending_samples >= max(1, round(min_new * SAMPLE_RATE))
                                        or (self.pending_samples > 0 and len(self._audio) > self._max_samples))
        return due and not self._skip_silence()

    def next_window(self) -> Window:
        audio = self._audio.head(self._max_samples)
        end = self._window_start + len(audio)
        self._decoded_until = max(self._decoded_until, end)
        full = len(audio) >= self._max_samples
        start_s = self._window_start / SAMPLE_RATE
        if self._rejected or self._fresh_due(len(audio), full):
            # Without prompt: in an encoder window shorter than 30 s, a previous-text prompt often
            # keeps Whisper from placing any timestamp (CTranslate2 does the same).  Segment ends
            # inside the committed text are what is needed, or a little beyond it.
            cap = None
            if not (full or self.finishing or self._rejected):
                cap = len(self._text(self._committed)) + self.settings.max_step_tokens
            temperature = FALLBACK_TEMPERATURE if self._rejected >= 2 else 0.0
            return Window(audio, [], [], start_s, end, fresh=True, max_new_tokens=cap, temperature=temperature)
        previous = self._prompt[-self.settings.max_prompt_tokens:] if self.settings.max_prompt_tokens else []
        cap = None if self.finishing or full else self.settings.max_step_tokens
        prompt = self._user_prompt + previous
        return Window(audio, prompt, list(self._committed), start_s, end, max_new_tokens=cap)

    def _fresh_due(self, window_samples: int, full: bool) -> bool:
        """A long window whose committed text has no segment end to cut at.

        Continuing a committed prefix, Whisper seldom places timestamps, so such a window is
        decoded once on its own: Whisper segments it afresh, and the cut goes where one of its
        segments ends inside the committed text.  After a fresh decode that found no cut, the next
        waits for a continuation and two more steps of audio (the committed text has to reach a
        segment's end first), unless the window is full.
        """
        if full and self._fresh_for_full:  # the continuation found no segment end: it would repeat
            return True
        if self.finishing and not full:
            # The last window, long (a session behind its audio): continuing the committed text
            # over it, Whisper places no timestamps and may jump from the committed text to the
            # last sentence, skipping what lies between; afresh it segments the window and hears it.
            return bool(self._text(self._committed)) and window_samples > self.settings.trim_after_s * SAMPLE_RATE
        if not self._text(self._committed) or self._cut_points(window_samples):
            return False
        if full:
            return True
        return (window_samples > self.settings.trim_after_s * SAMPLE_RATE
                and self.received_samples >= self._fresh_after and not self._regular_next)

    # -- results -------------------------------------------------------------------------------
    def apply(self, window: Window, result: WindowResult) -> str:
        """Take the engine's result for ``window``; returns the new delta (may be empty)."""
        current = window.fresh or window.prefix == self._committed
        if not current or window.start_s != self._window_start / SAMPLE_RATE:
            raise RuntimeError("a result for a window that is no longer current")
        self.decodes += 1
        self.fresh_decodes += window.fresh
        self.last_prompt_tokens = result.prompt_tokens
        s = self.settings
        silent = result.no_speech_prob > s.no_speech_threshold and result.avg_logprob < s.logprob_threshold
        output = list(result.tokens[len(window.prefix):])
        # Repetitive (Whisper's compression rule), or running past the audio: a timestamp later than
        # the window's end means the text before it was made up beyond what was heard (a short
        # window's loop: "Paris, Louis, Paris, Louis, Paris,<7.00>" for 4 s of audio).
        # Or skipping: a segment spanning more speech than its text says.
        repetitive = (result.compression_ratio > s.compression_ratio_threshold
                      or self._overruns(output, len(window.audio))
                      or self._dense(list(window.prefix), output, len(window.audio))
                      or self._skips(list(window.prefix), output, len(window.audio)))
        if silent or repetitive:
            # Never a reason to drop audio.  A window that matters (long enough to be cut, full,
            # or the last one) is decoded again: afresh (no prompt, no prefix), and a repetitive
            # one then afresh at a higher temperature; the last attempt is taken as it is.
            matters = (self.finishing or len(window.audio) > s.trim_after_s * SAMPLE_RATE
                       or len(window.audio) >= self._max_samples)
            if matters and self._rejected < (2 if repetitive else 1):
                self._rejected += 1
                self._history, self._pending = [], []
                return self._emit()
            if not matters:
                output = []  # a short window: nothing to commit from it, the next step decodes it again
        self._rejected = 0
        self._regular_next = self._regular_next and window.fresh
        if window.fresh:
            if silent:
                self._silence(window)
            else:
                self._apply_fresh(window, output)
            return self._emit()

        covers_all = window.end_sample >= self.received_samples
        if self.finishing and covers_all:
            self._commit(output)
            self._finish_window(len(window.audio))
            return self._emit()

        self._history = (self._history + [output])[-s.agreement:]
        if len(self._history) == s.agreement:
            latest = self._history[-1]
            if self._closed_early(self._committed + latest, len(window.audio)):
                self._commit(latest)
            else:
                texts = [self._text(h) for h in self._history]
                stable = min(_common_prefix(t, texts[-1]) for t in texts)
                self._commit_text(min(stable, len(texts[-1]) - s.holdback_tokens))
        rest = self._history[-1] if self._history else []  # the newest hypothesis beyond the commit
        self._pending = self._text(rest)

        # A window decoded before final:true arrived does not cover the audio sent since: it only
        # feeds the agreement, and the next window covers the rest.
        full = len(window.audio) >= self._max_samples
        if full:
            self._force(rest, len(window.audio))
        elif len(window.audio) > s.trim_after_s * SAMPLE_RATE:
            # After the committed text Whisper hears nothing more: no next word to tie the window to,
            # and none is needed, so the last segment end is a cut point too.
            quiet = not self._text(rest) and self._closed_early(self._committed, len(window.audio))
            if quiet and self._vad_used:  # and the VAD agrees that no speech follows
                end = self._committed_end()
                quiet = end is not None and self._silent(self._window_start + end + END_TOLERANCE, window.end_sample)
            self._trim(len(window.audio), anchored=not quiet)
        if self.finishing and len(self._audio) == 0:
            self.done = True
        return self._emit()

    @property
    def partial(self) -> str:
        """The newest hypothesis's text beyond ``text`` (not committed, not sent as a delta): what a
        display may show as pending, knowing that the next steps may still revise it; "" once done,
        after a decode heard as silence or rejected, and while a character is split across tokens."""
        if self.done or not self._pending:
            return ""
        pending = self._tok.decode(self.tokens[self._sent_tokens:] + self._pending).rstrip("\ufffd")
        return pending.lstrip() if not self.text else pending

    def _text(self, raw: Sequence[int]) -> list[int]:
        return [t for t in raw if t < self._tok.eot]

    def _new_segments(self, prefix: list[int], output: list[int], window_samples: int, closed_only: bool = False):
        """``(start_s, end_s, text tokens)`` of each segment of ``prefix + output`` that holds new
        text (window seconds; an open last segment ends with the window, and is left out with
        ``closed_only``)."""
        begin, whole = self._tok.timestamp_begin, prefix + output
        start, n_text, new = 0.0, 0, False
        for i, t in enumerate(whole + [None]):
            closing = t is None or (t >= begin and i > 0 and whole[i - 1] < begin)
            if closing:
                end = window_samples / SAMPLE_RATE if t is None else (t - begin) * TIME_PRECISION
                if new and not (closed_only and t is None):
                    yield start, max(start, end), n_text
                n_text, new = 0, False
            elif t >= begin:
                start = (t - begin) * TIME_PRECISION
            else:
                n_text += 1
                new = new or i >= len(prefix)

    def _dense(self, prefix: list[int], output: list[int], window_samples: int) -> bool:
        """Whether a segment holding new text has more text than its time span can (decoding.too_dense):
        a loop that stays within the window's time ("... Ages.<7.92><7.92> The earliest book, The
        Earliest Book, The Earliest Book, ..." for the last 0.9 s of a window)."""
        return any(too_dense(n, end - start) for start, end, n in self._new_segments(prefix, output, window_samples))

    def _skips(self, prefix: list[int], output: list[int], window_samples: int) -> bool:
        """Whether a segment holding new text spans more speech than its text can say (the VAD's
        speech, more than ``SPEECH_PER_TOKEN_S`` per text token and ``SKIP_SLACK_S``): Whisper
        jumped over what was said (a continuation "... of about<7.08><7.08> 1455.<13.08>" over
        two sentences that a fresh decode of the same window hears).  Only audio the VAD framed
        counts, and only segments Whisper closed: an open last one may just be cut short (a step's
        token cap), its speech still to be said."""
        if not self._vad_used:
            return False
        framed = self._framed_at - self._window_start
        for start, end, n in self._new_segments(prefix, output, window_samples, closed_only=True):
            a, b = round(start * SAMPLE_RATE), min(round(end * SAMPLE_RATE), framed)
            if b > a and self._voiced.sum(a, b) / SAMPLE_RATE > SPEECH_PER_TOKEN_S * n + SKIP_SLACK_S:
                return True
        return False

    def _overruns(self, output: Sequence[int], window_samples: int) -> bool:
        """Whether ``output`` places a timestamp more than ``OVERRUN_S`` after the window's audio."""
        limit = self._timestamp_at(window_samples + round(OVERRUN_S * SAMPLE_RATE))
        return any(t > limit for t in output if t >= self._tok.timestamp_begin)

    def _commit(self, raw: list[int]) -> None:
        """Commit ``raw``, the next tokens of the window's output."""
        self._committed += raw
        n_text = len(self._text(raw))
        self.tokens += self._text(raw)
        self._history = [self._drop_text(h, n_text) for h in self._history]

    def _commit_text(self, n_text: int) -> None:
        """Commit the latest hypothesis up to and including its ``n_text``-th text token.

        When every hypothesis puts a timestamp right after that token (a segment ends there,
        though the times may differ), the latest hypothesis's timestamps are committed too: they
        give the window the segment ends it is cut at.
        """
        if n_text <= 0:
            return
        begin = self._tok.timestamp_begin
        ends = [self._text_end(h, n_text) for h in self._history]
        latest, end = self._history[-1], ends[-1]
        if all(e < len(h) and h[e] >= begin for h, e in zip(self._history, ends)):
            while end < len(latest) and latest[end] >= begin:
                end += 1
        self._commit(latest[:end])

    def _closed_early(self, whole: list[int], window_samples: int) -> bool:
        """Whether the hypothesis ends with a segment closed at least ``step_s`` before the end of the
        window: Whisper heard the speech stop, so its last words are not cut off by the window's edge
        and need no holding back (the text is committed whole, its closing timestamp included)."""
        if not whole or whole[-1] < self._tok.timestamp_begin or len(whole) < 2 or whole[-2] >= self._tok.timestamp_begin:
            return False
        end = (whole[-1] - self._tok.timestamp_begin) * SAMPLES_PER_TIMESTAMP
        return window_samples - end >= self.settings.step_s * SAMPLE_RATE

    def _text_end(self, raw: Sequence[int], n_text: int) -> int:
        """Index just after the ``n_text``-th text token of ``raw``."""
        seen = 0
        for i, t in enumerate(raw):
            if t < self._tok.eot:
                seen += 1
                if seen == n_text:
                    return i + 1
        return len(raw)

    def _drop_text(self, raw: list[int], n_text: int) -> list[int]:
        return raw[self._text_end(raw, n_text):] if n_text else raw

    def _ends(self, raw: Sequence[int]) -> list[int]:
        """Indices ``i`` of segment ends: ``raw[i]`` is a timestamp right after text."""
        begin = self._tok.timestamp_begin
        return [i for i in range(1, len(raw)) if raw[i] >= begin and raw[i - 1] < begin]

    def _boundaries(self, raw: Sequence[int]) -> list[int]:
        """Indices ``i`` of complete segments' ends: a segment end followed by the next segment's start."""
        begin = self._tok.timestamp_begin
        return [i for i in self._ends(raw) if i + 1 < len(raw) and raw[i + 1] >= begin]

    def _samples_at(self, timestamp: int) -> int:
        return (timestamp - self._tok.timestamp_begin) * SAMPLES_PER_TIMESTAMP

    def _timestamp_at(self, samples: int) -> int:
        """The timestamp token of the latest time at or before ``samples``."""
        return self._tok.timestamp_begin + samples // SAMPLES_PER_TIMESTAMP

    def _cut_points(self, window_samples: int, anchored: bool = True) -> list[int]:
        """Segment ends inside the committed output where the window may be cut: placed within the
        audio Whisper heard and, when ``anchored``, followed by at least ``ANCHOR_TOKENS`` committed
        text tokens.  Those stay in the prefix and tie the next window to the text: a segment end
        placed a little early or late then neither repeats nor drops a word."""
        limit = self._timestamp_at(window_samples)
        ends = [i for i in self._ends(self._committed) if self._committed[i] <= limit]
        if anchored:
            ends = [i for i in ends if len(self._text(self._committed[i + 1:])) >= ANCHOR_TOKENS]
        return ends

    def _trim(self, window_samples: int, anchored: bool = True) -> None:
        """Cut the window at the last cut point of the committed output (see :meth:`_cut_points`)."""
        ends = self._cut_points(window_samples, anchored)
        if ends:
            i = ends[-1]
            self._cut(i + 1, self._samples_at(self._committed[i]), "text")

    def _force(self, rest: list[int], window_samples: int) -> None:
        """The window is full: commit the hypothesis through its last segment end and cut there.

        Without any segment end, nothing is cut: the next decode of the (full) window is a fresh one.
        """
        whole = self._committed + rest
        limit = self._timestamp_at(window_samples)
        ends = [i for i in self._ends(whole) if i >= len(self._committed) and whole[i] <= limit]
        if ends:
            self._commit(rest[: ends[-1] + 1 - len(self._committed)])
        before = len(self.stretches)
        self._trim(window_samples, anchored=False)
        self._fresh_for_full = len(self.stretches) == before  # nothing cut: decode it afresh next

    def _apply_fresh(self, window: Window, fresh: list[int]) -> None:
        """Cut at the last segment end of a fresh hypothesis that the committed text reaches.

        The fresh text differs from the committed one in places ("wood cutters" against
        "woodcutters", "books which" against "books, which"), so the two are aligned on their
        letters and digits (:class:`_Alignment`).  A segment end inside the committed text counts
        where it falls on a committed token's end; a complete segment (the next one has begun) that
        goes on past the committed text counts when the committed text's end is found in it, and its
        new text is committed.  The committed output after the cut becomes the next segment's
        opening timestamp followed by the rest of the committed text.  The last window of a
        finishing utterance commits the fresh text after the committed text; a full window commits
        through its last segment end even where the alignment is unsure (text decoded twice is better
        than text lost), and only a full window that Whisper does not segment at all is taken whole.
        """
        fresh_text = self._text(fresh)
        align = _Alignment(fresh_text, self._text(self._committed), self._piece)
        if self.finishing and window.end_sample >= self.received_samples:
            self._commit(fresh_text[align.after_committed():])
            ends = [i for i in self._ends(fresh) if fresh[i] <= self._timestamp_at(len(window.audio))]
            if ends and not self._text(fresh[ends[-1]:]):  # where Whisper's text ends
                end = self._samples_at(fresh[ends[-1]])
                if len(window.audio) - end >= self.settings.step_s * SAMPLE_RATE and end > 0:
                    self._cut(len(self._committed), end, "text")  # see _finish_window
                    return
            self._end()
            return
        full = len(window.audio) >= self._max_samples
        boundaries = set(self._boundaries(fresh))
        tail = align.tail()  # fresh text tokens up to the committed text's end (None: not found)
        best = None  # (fresh index of the segment end, committed text tokens before it, new fresh text)
        duration = self._timestamp_at(len(window.audio))
        for i in self._ends(fresh):
            if fresh[i] > duration:
                break  # a segment said to end after the audio does: Whisper is not listening here
            n_text = len(self._text(fresh[:i]))  # fresh text tokens before the end
            if tail is not None and n_text == tail:
                if full:  # no committed text after it to anchor the next window: only when forced
                    best = (i, None, [])
            elif tail is not None and n_text > tail:
                if self.settings.fresh_commits and i in boundaries:
                    best = (i, None, fresh_text[tail:n_text])
            elif (inside := align.committed_end(n_text)) is not None:
                if full or align.committed_len - inside >= ANCHOR_TOKENS:
                    best = (i, inside, [])
        if best is None and full:
            ends = self._boundaries(fresh) or self._ends(fresh)
            if ends:  # unsure where the committed text ends: from the furthest point it reaches
                start = align.after_committed()
                n_text = len(self._text(fresh[:ends[-1]]))
                best = (ends[-1], None, fresh_text[min(start, n_text):n_text])
            else:  # a full window that Whisper does not segment: taken whole (the last resort)
                self._commit(fresh_text[align.after_committed():])
                self._cut(len(self._committed), len(window.audio), "forced")
                return
        if best is None:  # no cut yet: the committed text has to reach a segment end first
            self._fresh_after = self.received_samples + round(2 * self.settings.step_s * SAMPLE_RATE)
            self._regular_next = True
            return
        i, n_committed, new = best
        self._commit(new)
        kept = self._text(self._committed)
        if n_committed is None:
            n_committed = len(kept)
        begin = self._tok.timestamp_begin
        opening = [fresh[i + 1]] if i + 1 < len(fresh) and fresh[i + 1] >= begin else []
        if not opening and n_committed < len(kept):
            opening = [fresh[i]]  # the rest of the committed text starts where the segment ended
        self._committed = kept[:n_committed] + opening + kept[n_committed:]
        self._cut(n_committed, self._samples_at(fresh[i]), "text")

    def _piece(self, token: int) -> str:
        """A token's letters and digits, lower case (what the alignment compares)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = "".join(ch for ch in self._tok.decode([token]).lower() if ch.isalnum())
        return piece

    def _silence(self, window: Window) -> None:
        """A window that decodes to nothing with the prompt and afresh: cut all but its last
        ``silence_keep_s`` (speech may be starting), or all of it at the end of the utterance."""
        if self.finishing and window.end_sample >= self.received_samples:
            self._end("silence")
            return
        keep = round(self.settings.silence_keep_s * SAMPLE_RATE)
        self._cut(len(self._committed), window.end_sample - self._window_start - keep, "silence")

    def _finish_window(self, window_samples: int) -> None:
        """The last window was decoded: done, unless Whisper stopped well before its end (its last
        segment closes ``step_s`` or more before the audio does, "... beneath the stroke,<12.08>" in
        19 s), which happens after long windows: then the window is cut there and the rest decoded."""
        ends = self._cut_points(window_samples, anchored=False)
        if ends and not self._text(self._committed[ends[-1]:]):
            end = self._samples_at(self._committed[ends[-1]])
            if window_samples - end >= self.settings.step_s * SAMPLE_RATE and end > 0:
                self._cut(ends[-1] + 1, end, "text")
                return
        self._end()

    def _end(self, reason: str = "end") -> None:
        """The last window: its audio is covered by everything committed in it."""
        self._cut(len(self._committed), len(self._audio), reason)
        self.done = True

    def _cut(self, index: int, samples: int, reason: str) -> None:
        """Drop ``samples`` of audio and the first ``index`` committed tokens (they become prompt)."""
        samples = min(samples, len(self._audio))
        if samples <= 0:
            return
        begin = self._tok.timestamp_begin
        shift = samples // SAMPLES_PER_TIMESTAMP
        covered = len(self._text(self._committed[:index]))
        if reason in ("text", "end") and not covered:
            reason = "empty"  # decoded and accepted, but no words in it
        self.stretches.append(Stretch(self._window_start / SAMPLE_RATE, (self._window_start + samples) / SAMPLE_RATE,
                                      covered, reason))
        self._prompt = (self._prompt + self._text(self._committed[:index]))[-MAX_PROMPT_TOKENS:]
        self._committed = [t if t < begin else max(begin, t - shift) for t in self._committed[index:]]
        self._history = []  # hypotheses of the old window no longer continue the new prefix
        self._fresh_for_full = False
        self._audio.drop_front(samples)
        self._voiced.drop_front(samples)
        self._window_start += samples
        self._fresh_after = 0

    def _emit(self) -> str:
        """The text committed since the last delta.  Only the tokens not yet sent are decoded (an
        hour-long utterance costs the same per step as a short one); they are held back while they
        end inside a multi-byte character."""
        new = self._tok.decode(self.tokens[self._sent_tokens:])
        if not self.done and new.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest
        raw = self._sent_raw + new
        text = raw.lstrip()
        self._sent_raw, self._sent_tokens = raw, len(self.tokens)
        delta, self.text = text[len(self.text):], text
        return delta


class AudioBuffer:
    """A growing run of float32 samples that is appended at the end and dropped at the front,
    without copying everything on every append (the window of a live session)."""

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE, np.float32)
        self._start = self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, np.float32).reshape(-1)
        if self._end + len(samples) > len(self._data):
            size = len(self)
            capacity = max(len(self._data), 2 * (size + len(samples)))
            data = np.zeros(capacity, np.float32) if capacity > len(self._data) else self._data
            data[:size] = self._data[self._start:self._end]  # compact (and grow when needed)
            self._data, self._start, self._end = data, 0, size
        self._data[self._end:self._end + len(samples)] = samples
        self._end += len(samples)

    def head(self, n: int) -> np.ndarray:
        """A copy of the first ``n`` samples (a window handed to the engine)."""
        return self.slice(0, n)

    def slice(self, a: int, b: int) -> np.ndarray:
        """A copy of samples ``[a, b)`` (clipped to the buffer)."""
        a, b = max(0, a), min(len(self), b)
        return self._data[self._start + a:self._start + b].copy() if b > a else np.zeros(0, np.float32)

    def drop_front(self, n: int) -> None:
        self._start = min(self._end, self._start + max(0, n))

    def drop_back(self, n: int) -> None:
        self._end = max(self._start, self._end - max(0, n))

    def fill(self, a: int, b: int, value: float) -> None:
        """Set samples ``[a, b)`` (clipped to the buffer) to ``value``."""
        a, b = max(0, a), min(len(self), b)
        if b > a:
            self._data[self._start + a:self._start + b] = value

    def sum(self, a: int, b: int) -> float:
        a, b = max(0, a), min(len(self), b)
        return float(self._data[self._start + a:self._start + b].sum()) if b > a else 0.0

    def max(self, a: int, b: int) -> float:
        """The largest of samples ``[a, b)`` (clipped to the buffer; 0 when empty)."""
        a, b = max(0, a), min(len(self), b)
        return float(self._data[self._start + a:self._start + b].max()) if b > a else 0.0


@dataclasses.dataclass(frozen=True)
class WordJob:
    """Committed text tokens to align in audio (``engine.AlignRequest``): ``audio`` is utterance
    samples ``[start, start + len(audio))``; ``first`` the index of ``tokens[0]`` in
    ``Utterance.tokens``; the first ``context`` tokens are the last word handed out (aligned again,
    not handed out again); ``final``: every word of it is handed out (else the last one waits)."""

    audio: np.ndarray
    tokens: list[int]
    start: int
    first: int
    context: int
    final: bool


class CommittedWords:
    """Word timestamps of an utterance's committed text (the realtime ``word_timestamps``
    extension), each word handed out once with times that never change.

    Pure code, like :class:`Utterance`: :meth:`jobs` says what to align after a step (the caller
    runs ``Engine.align`` on them), :meth:`take` turns the aligned words into the words to send.
    The committed tokens not yet handed out are aligned, after the last word handed out (aligned
    again from its start, as context), in the audio from that word's start to:

    * the end of the stretch of audio that left the window with them, once they have all left
      (``Utterance.stretches``): Whisper's own long-form alignment, a window ending at a segment
      end; every word of them is handed out;
    * else the end of the last decoded window; every word but the last is handed out (the last
      one's end is the least sure, and a punctuation mark committed next would still join it).

    The context matters: the alignment's path starts at its audio's first frame, so text aligned
    from the end of the last word would begin there even when a pause follows that word.  Times
    are utterance seconds, 10 ms apart, ordered and never overlapping.  The audio kept is what the
    unsent words and the context may lie in.  ``max_tokens``: the most text tokens one alignment
    takes (a full window's 224); a longer run, which committed text does not produce, is handed
    out without words.
    """

    MAX_TOKENS = 224

    def __init__(self, utterance: Utterance, max_tokens: int = MAX_TOKENS):
        self._u = utterance
        self.max_tokens = max_tokens
        self._audio = AudioBuffer()  # utterance samples from self._start on
        self._start = 0
        self._sent = 0  # utterance tokens whose words were handed out
        self._context = 0  # utterance token where the last word handed out begins
        self._context_start = 0  # utterance sample where it begins
        self._aligned = 0  # utterance tokens committed at the last alignment of the open text
        self._last_end = 0.0  # end of the last word handed out (utterance seconds)
        self._stretches = 0  # Utterance.stretches looked at
        self._covered = 0  # text tokens that left the window with them
        self._covered_end = 0  # utterance sample where the last of those stretches ends
        self.skipped = 0  # tokens handed out without words (see max_tokens)

    def add_audio(self, samples: np.ndarray) -> None:
        self._audio.append(samples)

    def drop_back(self, n: int) -> None:
        self._audio.drop_back(n)

    def _advance(self, sample: int) -> None:
        """Forget the audio before utterance sample ``sample``."""
        if sample > self._start:
            self._audio.drop_front(min(sample, self._start + len(self._audio)) - self._start)
            self._start = sample

    def _job(self, first: int, last: int, end: int, final: bool, begin: int | None = None) -> WordJob | None:
        """Tokens ``[first, last)`` in the audio up to utterance sample ``end``; ``begin``: where
        their audio begins when they follow another job's text (then no context)."""
        earliest = max(self._start, end - round(CHUNK_LENGTH * SAMPLE_RATE))  # at most a 30 s window
        if begin is not None:
            context, start = 0, max(begin, earliest)
        elif self._context < first and self._context_start >= earliest:
            context, start = first - self._context, self._context_start
        else:
            context, start = 0, earliest
        tokens = list(self._u.tokens[first - context:last])
        # a sliver of audio (a word placed past the cut the window later made): a little more
        end = max(end, min(start + MIN_WORD_AUDIO, self._start + len(self._audio)))
        if len(tokens) > self.max_tokens:
            self.skipped += last - first
            self._sent = self._context = last
            self._advance(end)
            self._context_start = self._start
            return None
        audio = self._audio.slice(start - self._start, max(start, end) - self._start)
        return WordJob(audio, tokens, start, first - context, context, final)

    def jobs(self) -> list[WordJob]:
        """What to align now (none when no new text was committed and no text left the window)."""
        u = self._u
        total = len(u.tokens)
        if self._sent >= total:  # keep the context's audio while it may still serve (see _job)
            window = u.window_start_sample
            self._advance(min(window, max(self._context_start, window - round(CHUNK_LENGTH * SAMPLE_RATE))))
            return []
        for stretch in u.stretches[self._stretches:]:  # text that left the window, and where its audio ends
            if stretch.tokens:
                self._covered += stretch.tokens
                self._covered_end = round(stretch.end_s * SAMPLE_RATE)
        self._stretches = len(u.stretches)
        out = []
        first, begin = self._sent, None
        if self._covered > first:
            job = self._job(first, self._covered, self._covered_end, True)
            out += [job] if job is not None else []
            first, begin = self._covered, self._covered_end
        if total > first and (total > self._aligned or u.done):
            self._aligned = total
            job = self._job(first, total, u.decoded_samples, u.done, begin)
            out += [job] if job is not None else []
        return out

    def take(self, jobs: Sequence[WordJob], aligned: Sequence) -> list:
        """The words to hand out, from ``Engine.align``'s ``WindowWords`` of each of ``jobs``:
        ``alignment.WordTiming`` in utterance seconds."""
        from .alignment import WordTiming  # numpy only, no JAX

        out = []
        for job, window in zip(jobs, aligned):
            # The context's words were handed out already.  Punctuation merging may move tokens
            # across its end: a word that begins inside the context is not handed out again (the
            # tokens it took past the context count as sent), unless what it took is a word.
            timings, seen = [], 0
            for t in window.timings:
                inside = seen < job.context
                extra = job.tokens[job.context:seen + len(t.tokens)] if inside else []
                if not inside or any(c.isalnum() for c in self._u.text_of(extra)):
                    timings.append((seen, t))
                seen += len(t.tokens)
            if not job.final:
                spoken = [i for i, (_, t) in enumerate(timings) if t.word]
                timings = timings[:spoken[-1]] if spoken else []
            offset = job.start / SAMPLE_RATE
            # the tokens before the first word handed out: the context and what merged into it
            sent = job.first + (timings[0][0] if timings else (seen if job.final else job.context))
            for _, t in timings:
                if t.word:
                    start = round(max(offset + t.start, self._last_end), 2)
                    end = round(max(offset + t.end, start), 2)
                    out.append(WordTiming(t.word, start, end, t.probability, list(t.tokens)))
                    self._last_end = end
                    self._context, self._context_start = sent, round(start * SAMPLE_RATE)
                sent += len(t.tokens)
            self._sent = sent
            if job.final:
                self._sent = job.first + len(job.tokens)
        if out:
            self._advance(self._context_start)
        return out


class _Alignment:
    """Where a fresh hypothesis's text meets the committed text, compared on letters and digits.

    Both texts (lists of text tokens) are reduced to their lower-case letters and digits, each
    character remembering its token, and aligned with difflib.  A point counts as found when the
    ``MATCH`` characters before it are matched (or all of them, for a shorter text) and it falls on
    the end of a token on both sides.
    """

    MATCH = 4

    def __init__(self, fresh: list[int], committed: list[int], piece: Callable[[int], str]):
        self.fresh, self.committed = fresh, committed
        self.committed_len = len(committed)
        self._f, self._f_owner = self._chars(fresh, piece)
        self._c, self._c_owner = self._chars(committed, piece)
        self._c_tokens = set(self._c_owner)  # committed tokens with letters or digits
        matcher = difflib.SequenceMatcher(None, self._f, self._c, autojunk=False)
        self._blocks = [b for b in matcher.get_matching_blocks() if b.size]

    @staticmethod
    def _chars(tokens: list[int], piece: Callable[[int], str]) -> tuple[str, list[int]]:
        chars, owner = [], []
        for i, t in enumerate(tokens):
            p = piece(t)
            chars.append(p)
            owner += [i] * len(p)
        return "".join(chars), owner

    def _last_of_token(self, owner: list[int], index: int) -> bool:
        return index + 1 >= len(owner) or owner[index + 1] != owner[index]

    def tail(self) -> int | None:
        """Fresh text tokens up to and including the committed text's last one (0 for no committed
        text); None when the committed text's end is not found in the fresh text."""
        if not self._c:
            return 0 if not self.committed else None
        end = len(self._c) - 1
        for b in self._blocks:
            if b.b <= end < b.b + b.size and end - b.b + 1 >= min(self.MATCH, len(self._c)):
                f = b.a + end - b.b
                if self._last_of_token(self._f_owner, f):
                    return self._f_owner[f] + 1
        return None

    def committed_end(self, n_fresh: int) -> int | None:
        """Committed text tokens that cover the same speech as the first ``n_fresh`` fresh ones (the
        punctuation tokens after them included); None when that point is not found."""
        if n_fresh <= 0:
            return None
        # the last character of the fresh text's first n_fresh tokens
        f = max((k for k, t in enumerate(self._f_owner) if t < n_fresh), default=None)
        if f is None or not self._last_of_token(self._f_owner, f):
            return None
        for b in self._blocks:
            if b.a <= f < b.a + b.size and f - b.a + 1 >= min(self.MATCH, f + 1):
                c = b.b + f - b.a
                if not self._last_of_token(self._c_owner, c):
                    return None
                n = self._c_owner[c] + 1
                while n < len(self.committed) and n not in self._c_tokens:  # punctuation after it
                    n += 1
                return n
        return None

    def after_committed(self) -> int:
        """Where the fresh text goes on past the committed text: after its found end, else after the
        matching run that reaches furthest into the committed text, else (nothing in common) at its
        start: text decoded twice is better than text lost."""
        tail = self.tail()
        if tail is not None:
            return tail
        solid = [b for b in self._blocks if b.size >= self.MATCH]
        if not solid:
            return 0
        furthest = max(solid, key=lambda b: b.b + b.size)
        # The committed text cannot stand for much more fresh text than its own length: a match far
        # beyond that is a coincidence (repeated words), and starting there would drop text.
        end = min(furthest.a + furthest.size, round(1.3 * len(self._c)) + 10, len(self._f_owner))
        return self._f_owner[end - 1] + 1 if end > 0 else 0
