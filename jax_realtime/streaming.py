"""Streaming policy for one utterance: which audio to decode next, and which text is stable.

Pure code: no JAX, no asyncio.  The caller feeds audio, asks for the next window to decode,
hands back the engine's result, and gets the newly stable text (a delta).

The policy (LocalAgreement-2 on tokens, after Macháček et al., "Turning Whisper into Real-Time
Transcription System", 2023):

* The *window* is the utterance's audio from ``window_start`` on (at most 30 s).  After every
  ``step_s`` of new audio it is decoded again in timestamp mode, conditioned on the text before
  the window (the prompt) and *continuing* the window's committed output (a forced prefix, its
  timestamps included): committed text is never decoded twice and never revised.
* New text is *committed* (and sent as a delta) once ``agreement`` consecutive hypotheses agree
  on it: the longest common prefix of their text tokens, less the last ``holdback_tokens`` of the
  newest hypothesis (the words at the edge of the audio, which the next step often revises).
  Tokens are compared, text is emitted: a delta is the new part of the decoded committed text,
  held back while it ends inside a multi-byte character.
* Once the window is longer than ``trim_after_s`` it is trimmed at a segment boundary (a pair of
  timestamps) inside the committed output: the text before it moves into the prompt and the
  committed tokens after it are re-timed.  If the window reaches its limit without such a boundary,
  the hypothesis is committed up to its last boundary (or whole) so utterances of any length work.
* A hypothesis Whisper itself would discard as silence (no-speech probability above 0.6 with an
  average log-probability below -1) or as repetitive (compression ratio above 2.4) counts as
  empty; a silent window is trimmed rather than left to grow.
* After ``finish()`` the remaining audio is decoded and everything is committed; ``text`` is then
  exactly the concatenation of all deltas.
* ``partial`` is the newest hypothesis's text beyond the committed text (the held-back or not yet
  agreed tail): what a display may show as pending, knowing the next steps may still revise it.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Protocol, Sequence

import numpy as np

from .audio import SAMPLE_RATE, TIME_PRECISION
from .config import StreamConfig


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
    fresh: bool = False  # decoded afresh (no prompt, no prefix), to find segment boundaries
    max_new_tokens: int | None = None  # what this decode may add


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Utterance:
    """The streaming state of one utterance."""

    def __init__(self, settings: StreamConfig, tokenizer: TokenText, initial_prompt: Sequence[int] = ()):
        self.settings = settings
        self._tok = tokenizer
        self._audio = np.zeros(0, np.float32)  # audio from the window's start to the newest sample
        self._window_start = 0  # utterance sample index of _audio[0]
        self._decoded_until = 0  # utterance sample index the last requested window reached
        self._prompt = list(initial_prompt)  # text before the window (and the user's prompt)
        self._committed: list[int] = []  # the window's committed output, timestamps included
        self._history: list[list[int]] = []  # latest hypotheses' continuations of _committed
        self.tokens: list[int] = []  # every committed text token of the utterance
        self.text = ""  # the concatenation of every delta returned
        self._hypothesis: list[int] = []  # the newest hypothesis's text tokens of the whole utterance
        self._next_resegment = 0  # utterance sample index before which no fresh decode is tried
        self.finishing = False
        self.done = False
        self.decodes = 0
        self.last_prompt_tokens = 0

    # -- audio ---------------------------------------------------------------------------------
    @property
    def received_samples(self) -> int:
        return self._window_start + len(self._audio)

    @property
    def pending_samples(self) -> int:
        """Audio received but not yet part of any decoded window."""
        return self.received_samples - self._decoded_until

    def add_audio(self, samples: np.ndarray) -> None:
        if self.finishing:
            raise RuntimeError("the utterance is finishing: no more audio")
        self._audio = np.concatenate([self._audio, np.asarray(samples, np.float32)])

    def drop_pending(self) -> int:
        """Forget audio not yet part of any decoded window (``input_audio_buffer.clear``)."""
        dropped = self.pending_samples
        if dropped:
            self._audio = self._audio[: len(self._audio) - dropped]
        return dropped

    def finish(self) -> None:
        self.finishing = True
        if len(self._audio) == 0:  # nothing left to decode
            self.done = True

    # -- scheduling ----------------------------------------------------------------------------
    def wants_decode(self, min_new_s: float | None = None) -> bool:
        """Whether a decode is due: the utterance is finishing, or at least ``min_new_s`` (default
        ``step_s``) of audio arrived since the last window was taken."""
        if self.done:
            return False
        if self.finishing:
            return True
        min_new = self.settings.step_s if min_new_s is None else min_new_s
        return len(self._audio) > 0 and self.pending_samples >= max(1, round(min_new * SAMPLE_RATE))

    def next_window(self) -> Window:
        audio = self._audio[: round(self.settings.max_window_s * SAMPLE_RATE)]
        end = self._window_start + len(audio)
        self._decoded_until = max(self._decoded_until, end)
        prompt = self._prompt[-self.settings.max_prompt_tokens:] if self.settings.max_prompt_tokens else []
        if self._resegment_due(len(audio)):
            # Without prompt: in an encoder window shorter than 30 s, a previous-text prompt
            # often keeps Whisper from placing any timestamp (CTranslate2 does the same).  Only
            # boundaries inside the committed text are of use: a little beyond it is enough.
            cap = len(self._text(self._committed)) + 16
            return Window(audio, [], [], self._window_start / SAMPLE_RATE, end, fresh=True, max_new_tokens=cap)
        full = len(audio) >= round(self.settings.max_window_s * SAMPLE_RATE)  # forced to commit: no cap
        cap = None if self.finishing or full else self.settings.max_step_tokens
        return Window(audio, prompt, list(self._committed), self._window_start / SAMPLE_RATE, end, max_new_tokens=cap)

    def _resegment_due(self, window_samples: int) -> bool:
        """A long window whose committed output has no segment boundary to trim at.

        Continuing a long committed prefix, Whisper often stops placing timestamps, so the
        window is decoded once on its own: Whisper segments it afresh.
        """
        return (not self.finishing and window_samples > self.settings.trim_after_s * SAMPLE_RATE
                and bool(self._text(self._committed)) and not self._boundaries(self._committed)
                and self.received_samples >= self._next_resegment)

    # -- results -------------------------------------------------------------------------------
    def apply(self, window: Window, result: WindowResult) -> str:
        """Take the engine's result for ``window``; returns the new delta (may be empty)."""
        current = window.fresh or window.prefix == self._committed
        if not current or window.start_s != self._window_start / SAMPLE_RATE:
            raise RuntimeError("a result for a window that is no longer current")
        self.decodes += 1
        self.last_prompt_tokens = result.prompt_tokens
        s = self.settings
        silent = result.no_speech_prob > s.no_speech_threshold and result.avg_logprob < s.logprob_threshold
        repetitive = result.compression_ratio > s.compression_ratio_threshold
        continuation = [] if silent or repetitive else list(result.tokens[len(window.prefix):])
        window_s = len(window.audio) / SAMPLE_RATE
        covers_all = window.end_sample >= self.received_samples
        if window.fresh:
            self._resegment(continuation)
            return self._emit()

        if self.finishing and covers_all:
            self._commit(continuation)
            self.done = True
            return self._emit()

        self._hypothesis = self.tokens + self._text(continuation)
        self._history = (self._history + [continuation])[-s.agreement:]
        if len(self._history) == s.agreement:
            texts = [self._text(h) for h in self._history]
            stable = min(_common_prefix(t, texts[-1]) for t in texts)
            self._commit_text(min(stable, len(texts[-1]) - s.holdback_tokens))
        continuation = self._history[-1]  # what is left of it after the commit

        # A window decoded before final:true arrived does not cover the audio sent since: it only
        # feeds the agreement, and the next window covers the rest.  Only a full window is forced.
        full = window_s >= s.max_window_s - 1e-6
        if full or window_s > s.trim_after_s:
            if self._committed or continuation:
                self._trim(continuation, len(window.audio), force=full)
            else:
                self._trim_silence(window)
        if self.finishing and len(self._audio) == 0:
            self.done = True
        return self._emit()

    @property
    def partial(self) -> str:
        """The newest hypothesis's text beyond ``text`` (not committed, not sent as a delta);
        "" once done or when the hypothesis no longer extends the committed tokens."""
        n = len(self.tokens)
        if self.done or len(self._hypothesis) <= n or self._hypothesis[:n] != self.tokens:
            return ""
        text = self._tok.decode(self._hypothesis).lstrip()
        return text[len(self.text):].rstrip("\ufffd") if text.startswith(self.text) else ""

    def _text(self, raw: Sequence[int]) -> list[int]:
        return [t for t in raw if t < self._tok.eot]

    def _commit(self, raw: list[int]) -> None:
        """Commit ``raw``, the next tokens of the window's output."""
        self._committed += raw
        self.tokens += self._text(raw)
        n_text = len(self._text(raw))
        self._history = [self._drop_text(h, n_text) for h in self._history]

    def _commit_text(self, n_text: int) -> None:
        """Commit the latest hypothesis up to and including its ``n_text``-th text token.

        When every hypothesis puts a timestamp right after that token (a segment ends there,
        though the times may differ), the latest hypothesis's timestamps are committed too: they
        give the window the segment boundaries it is trimmed at.
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

    def _boundaries(self, raw: Sequence[int]) -> list[int]:
        """Indices ``i`` where ``raw[i-1]`` closes a segment and ``raw[i]`` opens the next."""
        begin = self._tok.timestamp_begin
        return [i for i in range(1, len(raw)) if raw[i - 1] >= begin and raw[i] >= begin]

    def _trim(self, continuation: list[int], window_samples: int, force: bool) -> None:
        """Move the window's start to a segment boundary inside the committed output.

        With ``force`` (the window is at its limit, or the utterance is finishing with more audio
        than one window) the hypothesis is committed up to its last boundary first, or whole.
        """
        if force:
            whole = self._committed + continuation
            cuts = [i for i in self._boundaries(whole) if i >= len(self._committed)]
            if not cuts:  # no boundary at all: commit the whole hypothesis and start a fresh window
                self._commit(continuation)
                self._cut(len(self._committed), window_samples)
                return
            self._commit(continuation[: cuts[-1] + 1 - len(self._committed)])  # through the opening timestamp
        cuts = [i for i in self._boundaries(self._committed) if i < len(self._committed)]
        if cuts:
            i = cuts[-1]
            self._cut(i, (self._committed[i - 1] - self._tok.timestamp_begin) * round(TIME_PRECISION * SAMPLE_RATE))

    def _resegment(self, fresh: list[int]) -> None:
        """Trim at the last boundary of a fresh hypothesis that falls inside the committed text.

        The fresh text may differ from the committed one in places ("home. Awake ye" against
        "home, awake ye"), so the two are aligned token by token (difflib); a boundary counts
        when the two tokens before it are aligned.  The committed output after it becomes the
        fresh segment's opening timestamp followed by the rest of the committed text.
        """
        committed = self._text(self._committed)
        fresh_text = self._text(fresh)
        aligned = {}
        matcher = difflib.SequenceMatcher(None, fresh_text, committed, autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                aligned[block.a + k] = block.b + k
        best = None
        for i in self._boundaries(fresh):
            n_text = len(self._text(fresh[:i]))  # fresh text tokens before the boundary
            if n_text >= 2 and aligned.get(n_text - 1) is not None and aligned.get(n_text - 2) == aligned[n_text - 1] - 1:
                best = (i, aligned[n_text - 1] + 1)
        if best is None:
            self._next_resegment = self.received_samples + round(self.settings.trim_after_s / 2 * SAMPLE_RATE)
            return
        i, n_committed = best
        self._committed = committed[:n_committed] + [fresh[i]] + committed[n_committed:]
        self._cut(n_committed, (fresh[i - 1] - self._tok.timestamp_begin) * round(TIME_PRECISION * SAMPLE_RATE))

    def _cut(self, index: int, samples: int) -> None:
        """Drop ``samples`` of audio and the first ``index`` committed tokens (they become prompt)."""
        samples = min(samples, len(self._audio))
        if samples <= 0:
            return
        begin = self._tok.timestamp_begin
        shift = samples // round(TIME_PRECISION * SAMPLE_RATE)
        self._prompt += self._text(self._committed[:index])
        self._committed = [t if t < begin else max(begin, t - shift) for t in self._committed[index:]]
        self._history = []  # hypotheses of the old window no longer continue the new prefix
        self._audio = self._audio[samples:]
        self._window_start += samples

    def _trim_silence(self, window: Window) -> None:
        """A window that decodes to nothing: keep only its last second (speech may be starting)."""
        keep = 0 if self.finishing else round(self.settings.silence_keep_s * SAMPLE_RATE)
        cut = max(0, window.end_sample - self._window_start - keep)
        self._audio = self._audio[cut:]
        self._window_start += cut
        self._history = []

    def _emit(self) -> str:
        text = self._tok.decode(self.tokens).lstrip()
        if not self.done and text.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest
        if not text.startswith(self.text):
            return ""  # committed tokens only grow, so this cannot happen; never un-send text
        delta, self.text = text[len(self.text):], text
        return delta
