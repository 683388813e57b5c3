"""Streaming policy for one utterance: which audio to decode next, and which text is stable.

Pure code: no JAX, no asyncio.  The caller feeds audio, asks for the next window to decode,
hands back the engine's result, and gets the newly stable text (a delta).

The policy (LocalAgreement-2 on tokens, after Macháček et al., "Turning Whisper into Real-Time
Transcription System", 2023):

* The *window* is the utterance's audio from ``window_start`` on (at most 30 s).  After every
  ``step_s`` of new audio it is decoded again, with timestamps and with the text already committed
  before the window as the prompt.
* A token is *committed* (and sent as a delta) once two consecutive hypotheses of the same
  window agree on it: the committed text is the longest common prefix of the last two
  hypotheses.  Tokens are compared, text is emitted: a delta is the new part of the decoded
  committed text, held back while it ends inside a multi-byte character.
* Before the window grows past ``trim_after_s``, it is trimmed at the end of a completed
  segment whose text is fully committed; that text moves into the prompt.  If the window reaches
  the 30 s limit without such a segment, completed segments are committed as they are (or, with
  none, the whole hypothesis) so utterances of any length work.
* A hypothesis Whisper itself would discard as silence (no-speech probability above 0.6 with an
  average log-probability below -1, or a compression ratio above 2.4) counts as empty; a silent
  window is trimmed instead of growing.
* After ``finish()`` the remaining audio is decoded and everything is committed; ``text`` is then
  exactly the concatenation of all deltas.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np

from .audio import SAMPLE_RATE
from .config import StreamConfig


class _Segment(Protocol):
    end: float
    tokens: list[int]
    complete: bool


class WindowResult(Protocol):
    """What the policy reads from an engine result (``engine.DecodeResult`` provides it)."""

    segments: Sequence[_Segment]
    no_speech_prob: float
    avg_logprob: float
    compression_ratio: float
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Window:
    """A request to decode ``audio`` (the window), conditioned on ``prompt`` (previous text)."""

    audio: np.ndarray
    prompt: list[int]
    start_s: float  # where the window starts in the utterance
    end_sample: int  # utterance sample index at which the window ends


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Utterance:
    """The streaming state of one utterance."""

    def __init__(self, settings: StreamConfig, decode_text: Callable[[Sequence[int]], str],
                 initial_prompt: Sequence[int] = ()):
        self.settings = settings
        self._decode_text = decode_text
        self._audio = np.zeros(0, np.float32)  # audio from window_start to the newest sample
        self._window_start = 0  # utterance sample index of _audio[0]
        self._decoded_until = 0  # utterance sample index the last requested window reached
        self._prompt = list(initial_prompt)  # committed text before the window (+ the user's prompt)
        self._window_committed: list[int] = []  # committed tokens inside the current window
        self._history: list[list[int]] = []  # the latest hypotheses of the current window
        self.tokens: list[int] = []  # every committed token of the utterance
        self.text = ""  # the concatenation of every delta sent
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
        if self.received_samples == 0:
            self.done = True

    # -- scheduling ----------------------------------------------------------------------------
    def wants_decode(self) -> bool:
        if self.done:
            return False
        if self.finishing:
            return True
        step = round(self.settings.step_s * SAMPLE_RATE)
        return self.pending_samples >= step and len(self._audio) > 0

    def next_window(self) -> Window:
        limit = round(self.settings.max_window_s * SAMPLE_RATE)
        audio = self._audio[:limit]
        end = self._window_start + len(audio)
        self._decoded_until = max(self._decoded_until, end)
        prompt = self._prompt[-self.settings.max_prompt_tokens:]
        return Window(audio, prompt, self._window_start / SAMPLE_RATE, end)

    # -- results -------------------------------------------------------------------------------
    def _hypothesis(self, result: WindowResult) -> tuple[list[int], list[_Segment]]:
        s = self.settings
        silent = result.no_speech_prob > s.no_speech_threshold and result.avg_logprob < s.logprob_threshold
        if silent or result.compression_ratio > s.compression_ratio_threshold:
            return [], []
        segments = [seg for seg in result.segments if seg.tokens]
        return [t for seg in segments for t in seg.tokens], segments

    def apply(self, window: Window, result: WindowResult) -> str:
        """Take the engine's result for ``window``; returns the new delta (may be empty)."""
        self.decodes += 1
        self.last_prompt_tokens = result.prompt_tokens
        hypothesis, segments = self._hypothesis(result)
        covers_all = window.end_sample >= self.received_samples
        window_s = len(window.audio) / SAMPLE_RATE
        aligned = self._aligned(hypothesis)

        if self.finishing and covers_all:
            self._commit(hypothesis, aligned, len(hypothesis))
            self.done = True
            return self._emit()

        self._history = (self._history + [hypothesis])[-self.settings.agreement:]
        if len(self._history) == self.settings.agreement:
            continuations = [h[self._aligned(h):] for h in self._history]
            stable = len(continuations[-1])
            for other in continuations[:-1]:
                stable = min(stable, _common_prefix(other, continuations[-1]))
            aligned = self._commit(hypothesis, aligned, aligned + stable)

        full = window_s >= self.settings.max_window_s - 1e-6
        if not hypothesis and (window_s > self.settings.trim_after_s or full or self.finishing):
            self._trim_silence(window)
        elif window_s > self.settings.trim_after_s or full or (self.finishing and not covers_all):
            self._trim(hypothesis, segments, aligned, force=full or self.finishing)
        return self._emit()

    def _aligned(self, hypothesis: list[int]) -> int:
        """Where the window's committed text ends in ``hypothesis``.

        Usually the hypothesis starts with the committed tokens.  When Whisper revised them, the
        continuation starts after the last place the committed text's final tokens appear.
        """
        done = self._window_committed
        if hypothesis[: len(done)] == done:
            return len(done)
        for n in range(min(4, len(done)), 0, -1):
            tail = done[-n:]
            hits = [i + n for i in range(len(hypothesis) - n + 1) if hypothesis[i:i + n] == tail]
            if hits:
                return min(hits, key=lambda i: abs(i - len(done)))
        return min(len(done), len(hypothesis))

    def _commit(self, hypothesis: list[int], aligned: int, upto: int) -> int:
        """Commit ``hypothesis[aligned:upto]``; returns the new aligned position."""
        if upto > aligned:
            self.tokens += hypothesis[aligned:upto]
            self._window_committed = hypothesis[:upto]
            return upto
        return aligned

    def _trim(self, hypothesis: list[int], segments: list[_Segment], aligned: int, force: bool) -> None:
        """Move the window's start to the end of the last completed segment that is committed.

        With ``force`` (the window is full, or the utterance is finishing) the completed segments
        are committed first; with no completed segment, the whole hypothesis is.
        """
        cut_s, count, total = None, 0, 0
        for seg in segments:
            if not seg.complete:
                break
            total += len(seg.tokens)
            if force or total <= aligned:
                cut_s, count = seg.end, total
        if force and cut_s is None:
            cut_s, count = len(self._audio[: round(self.settings.max_window_s * SAMPLE_RATE)]) / SAMPLE_RATE, len(hypothesis)
        if cut_s is None or cut_s <= 0:
            return
        if force:
            aligned = self._commit(hypothesis, aligned, count)
        moved = hypothesis[:count]
        self._prompt += moved
        self._window_committed = hypothesis[count:aligned]
        self._history = [h[count:] for h in self._history if h[:count] == moved]
        cut = min(round(cut_s * SAMPLE_RATE), len(self._audio))
        self._audio = self._audio[cut:]
        self._window_start += cut

    def _trim_silence(self, window: Window) -> None:
        """A window that decodes to nothing: keep only its last second (speech may be starting)."""
        if self._window_committed:
            return
        keep = round(self.settings.silence_keep_s * SAMPLE_RATE)
        cut = max(0, window.end_sample - self._window_start - keep)
        if self.finishing:
            cut = window.end_sample - self._window_start
        self._audio = self._audio[cut:]
        self._window_start += cut
        self._history = []

    def _emit(self) -> str:
        text = self._decode_text(self.tokens).lstrip()
        if not self.done and text.endswith("\ufffd"):
            return ""  # a character split across tokens: wait for the rest
        if not text.startswith(self.text):
            return ""  # cannot happen with committed tokens only growing; never un-send text
        delta, self.text = text[len(self.text):], text
        return delta
