"""Word-level timestamps: Whisper's cross-attention alignment, as openai-whisper (``timing.py``)
and CTranslate2/faster-whisper compute it.

For one window: run the decoder once over ``[start sequence, <|notimestamps|>, text tokens...,
<|endoftext|>]`` with the window's audio features and keep the cross-attention scores of the
checkpoint's *alignment heads* (heads whose attention follows the speech).  Then, per head: softmax
over the audio positions of the real audio, normalise over the tokens (zero mean, unit variance:
CTranslate2's ``LayerNorm(axis=-2, epsilon=0)``, openai's ``std_mean``), median-filter along time
(width 7, reflecting at the real audio's end); average the heads; and find the monotonic path
through the rows ``<|notimestamps|>, text...`` that collects the most attention (dynamic time
warping on the negated matrix).  The audio position where the path enters a token's row is where
that token starts; a word starts where its first token does and ends where the next word starts.

Two halves:

* On the device (``jax.numpy`` functions traced inside the engine's compiled functions; no jit
  here): :func:`attention_matrix` (softmax, normalisation, median filter, head mean) and
  :func:`dtw_first_positions` (the DTW as a ``lax.scan`` over anti-diagonals, its backtrace as a
  fixed-length ``lax.scan``).  Static shapes: a batch of rows padded to a token-length bucket and an
  encoder window; each row's real text length and audio length are masks.  Only ``[batch, tokens]``
  integers come back to the host.
* On the host (numpy/python on those few integers): :func:`split_to_word_tokens` (spaces, or
  unicode code points for languages written without spaces), :func:`find_words`,
  :func:`window_words` (Whisper's clamp of over-long words at sentence ends from the median word
  duration, and its punctuation merging) and :func:`segment_words` (words given to segments, with
  Whisper's heuristics at pauses and segment edges).

Two rules are added to Whisper's, because its heuristics leave words stretched over pauses (the
DTW has to give every audio position to some token, and the word before or after a pause often
takes the pause too; faster-whisper does the same):

* silence (:func:`silent_runs`): a word is trimmed off a run of at least 0.2 s of audio 45 dB or
  more below the window's loud frames (its 95th percentile of 20 ms frame levels) that covers its
  start or its end; a word wholly inside such a run is moved to the run's nearer edge.  Recordings
  whose pauses are noisier than that are left as Whisper has them.
* order: every word starts no earlier than the previous one ends, and a segment spans its words
  (see :func:`segment_words`).

The DTW reproduces CTranslate2's ``negative_dtw`` cell by cell (float32, the same comparisons and
tie-breaking), so the same attention matrix gives the same path.

Alignment heads (:func:`alignment_heads`): the checkpoint's own list (``alignment_heads`` in a
CTranslate2 ``config.json``, or in a Hugging Face ``generation_config.json``/``config.json``);
else openai-whisper's table for the official model names; else every head of the last half of the
decoder layers (openai-whisper's default before a model's heads are set).
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .audio import SAMPLE_RATE, TOKENS_PER_SECOND

MEDIAN_FILTER_WIDTH = 7
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"
UNICODE_SPLIT_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}  # written without spaces between words
MAX_MEDIAN_DURATION = 0.7  # seconds: Whisper's cap on the median word duration used by its heuristics
SILENCE_DB = -45.0  # a 20 ms frame this far below the window's loud frames (95th percentile) is silent
SILENCE_MIN_S = 0.2  # ... and a pause is at least this many silent frames in a row

# -- alignment heads -----------------------------------------------------------------------------

# openai-whisper's _ALIGNMENT_HEADS: base85 of a gzipped boolean [n_text_layer, n_text_head] array.
OPENAI_ALIGNMENT_HEADS = {
    "tiny.en": b"ABzY8J1N>@0{>%R00Bk>$p{7v037`oCl~+#00",
    "tiny": b"ABzY8bu8Lr0{>%RKn9Fp%m@SkK7Kt=7ytkO",
    "base.en": b"ABzY8;40c<0{>%RzzG;p*o+Vo09|#PsxSZm00",
    "base": b"ABzY8KQ!870{>%RzyTQH3`Q^yNP!>##QT-<FaQ7m",
    "small.en": b"ABzY8>?_)10{>%RpeA61k&I|OI3I$65C{;;pbCHh0B{qLQ;+}v00",
    "small": b"ABzY8DmU6=0{>%Rpa?J`kvJ6qF(V^F86#Xh7JUGMK}P<N0000",
    "medium.en": b"ABzY8usPae0{>%R7<zz_OvQ{)4kMa0BMw6u5rT}kRKX;$NfYBv00*Hl@qhsU00",
    "medium": b"ABzY8B0Jh+0{>%R7}kK1fFL7w6%<-Pf*t^=N)Qr&0RR9",
    "large-v1": b"ABzY8r9j$a0{>%R7#4sLmoOs{s)o3~84-RPdcFk!JR<kSfC2yj",
    "large-v2": b"ABzY8zd+h!0{>%R7=D0pU<_bnWW*tkYAhobTNnu$jnkEkXqp)j;w1Tzk)UH3X%SZd&fFZ2fC2yj",
    "large-v3": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large-v3-turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
    "turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
}

Heads = tuple[tuple[int, int], ...]  # (decoder layer, head)


def _official_name(name: str) -> str:
    """``openai/whisper-small.en`` -> ``small.en``; other names unchanged."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base[len("whisper-"):] if base.startswith("whisper-") else base


def _valid(heads, n_layer: int, n_head: int) -> Heads | None:
    try:
        pairs = tuple(sorted({(int(layer), int(head)) for layer, head in heads}))
    except (TypeError, ValueError):
        return None
    if not pairs or any(not (0 <= layer < n_layer and 0 <= head < n_head) for layer, head in pairs):
        return None
    return pairs


def _heads_in_files(directory: str, n_layer: int, n_head: int) -> Heads | None:
    for filename in ("config.json", "generation_config.json"):  # CTranslate2 / Hugging Face
        path = os.path.join(directory, filename)
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("alignment_heads")
        except (OSError, ValueError, AttributeError):
            continue
        if value is not None and (heads := _valid(value, n_layer, n_head)) is not None:
            return heads
    return None


def alignment_heads(name: str, directory: str | None, n_layer: int, n_head: int) -> tuple[Heads, str]:
    """The checkpoint's alignment heads and where they came from (``"checkpoint"``, ``"openai"``
    or ``"fallback"``).  ``directory`` holds the checkpoint's config files (the engine passes the
    directory of its ``tokenizer.json``, which every supported format keeps beside them)."""
    if directory is not None and (heads := _heads_in_files(directory, n_layer, n_head)) is not None:
        return heads, "checkpoint"
    dump = OPENAI_ALIGNMENT_HEADS.get(_official_name(name))
    if dump is not None:
        mask = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)
        if mask.size == n_layer * n_head:
            rows, cols = np.nonzero(mask.reshape(n_layer, n_head))
            return tuple(zip(rows.tolist(), cols.tolist())), "openai"
    return tuple((layer, head) for layer in range(n_layer // 2, n_layer) for head in range(n_head)), "fallback"


# -- on the device ---------------------------------------------------------------------------------

def _median7(taps):
    """Element-wise median of seven arrays: an optimal 16-comparator sorting network for seven
    inputs (XLA drops the comparators that do not reach the middle output)."""
    v = list(taps)
    for a, b in ((0, 6), (2, 3), (4, 5), (0, 2), (1, 4), (3, 6), (0, 1), (2, 5), (3, 4), (1, 2), (4, 6),
                 (2, 3), (4, 5), (1, 2), (3, 4), (5, 6)):
        v[a], v[b] = jnp.minimum(v[a], v[b]), jnp.maximum(v[a], v[b])
    return v[3]


def median_filter(x, n_frames, width: int = MEDIAN_FILTER_WIDTH):
    """Median filter of ``width`` along the last axis of ``x`` ([B, ..., T]) with reflect padding at
    each row's real length ``n_frames`` ([B]), as CTranslate2's ``MedianFilter`` (and openai's
    ``F.pad(mode="reflect")``).  Rows no longer than ``width // 2`` are passed through unchanged.

    Each row is padded once (reflected columns written at its own end), then the seven taps are
    static slices: no gather over the whole array."""
    if width != 7:
        raise ValueError("only Whisper's median filter width 7 is implemented")
    rank = width // 2
    frames = x.shape[-1]
    # positions n, n+1, n+2 of a row of length n read n-2, n-3, n-4; positions -1, -2, -3 read 1, 2, 3
    tail_index = jnp.clip(n_frames[:, None] - 2 - jnp.arange(rank)[None, :], 0, frames - 1)  # [B, rank]
    tail_index = tail_index.reshape((-1,) + (1,) * (x.ndim - 2) + (rank,))
    tail = jnp.take_along_axis(x, jnp.broadcast_to(tail_index, x.shape[:-1] + (rank,)), axis=-1)
    head = x[..., rank:0:-1] if frames > rank else jnp.zeros(x.shape[:-1] + (rank,), x.dtype)
    padded = jnp.concatenate([head, x, jnp.zeros(x.shape[:-1] + (rank,), x.dtype)], axis=-1)
    padded = jax.vmap(lambda row, t, at: jax.lax.dynamic_update_slice_in_dim(row, t, at, axis=-1))(
        padded, tail, n_frames + rank)
    filtered = _median7([padded[..., k:k + frames] for k in range(width)])
    n = n_frames.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(n > rank, filtered, x)


def attention_matrix(scores, n_tokens, n_frames):
    """Cross-attention scores of the alignment heads ([B, heads, S, T]: pre-softmax, scaled QK of
    the S sequence tokens over the T audio positions of the window) to the matrix the DTW walks
    ([B, S, T]), for rows whose first ``n_tokens`` tokens and ``n_frames`` positions are real."""
    batch, _, length, frames = scores.shape
    frame_ok = (jnp.arange(frames)[None, :] < n_frames[:, None])[:, None, None, :]  # [B, 1, 1, T]
    token_ok = (jnp.arange(length)[None, :] < n_tokens[:, None])[:, None, :, None]  # [B, 1, S, 1]
    scores = jnp.where(frame_ok, scores.astype(jnp.float32), -jnp.inf)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    # normalise over the real tokens (per head and position): CTranslate2's LayerNorm(-2, epsilon 0)
    count = jnp.maximum(n_tokens, 1).astype(jnp.float32)[:, None, None, None]
    mean = jnp.sum(jnp.where(token_ok, weights, 0.0), axis=-2, keepdims=True) / count
    centred = jnp.where(token_ok, weights - mean, 0.0)
    variance = jnp.sum(centred * centred, axis=-2, keepdims=True) / count
    weights = jnp.where(token_ok & frame_ok, centred / jnp.sqrt(variance), 0.0)
    weights = jnp.where(jnp.isfinite(weights), weights, 0.0)  # padding rows, constant columns
    return jnp.mean(median_filter(weights, n_frames), axis=1)


def dtw_first_positions(matrix, n_rows, n_frames):
    """For each row of ``matrix`` ([B, N, T]; the first ``n_rows`` rows and ``n_frames`` columns of
    each are real), the first column of the DTW path in that row: ``[B, N]`` int32 (rows past
    ``n_rows`` hold ``T``).

    The path maximises the summed matrix (CTranslate2's ``negative_dtw``: costs ``-x``), from cell
    (0, 0) to (n_rows - 1, n_frames - 1), stepping right, down or diagonally.  The cost table is
    filled one anti-diagonal per ``lax.scan`` step (every cell of a diagonal depends only on the
    two before it), as float32 with CTranslate2's comparisons, so ties break the same way; the
    backtrace is a scan of ``N + T`` steps from each row's own end cell.
    """
    batch, n_max, t_max = matrix.shape
    inf = jnp.float32(jnp.inf)
    i = jnp.arange(n_max + 1)  # cost-table rows 0..N (row 0 and column 0 are the boundary)
    diagonals = jnp.arange(1, n_max + t_max + 1)  # d = i + j
    j = diagonals[:, None] - i[None, :]  # [D, N+1] column of cell (i, d - i)
    inside = (i[None, :] >= 1) & (j >= 1) & (j <= t_max)
    skewed = matrix.astype(jnp.float32)[:, jnp.clip(i - 1, 0, n_max - 1)[None, :], jnp.clip(j - 1, 0, t_max - 1)]
    skewed = jnp.transpose(skewed, (1, 0, 2))  # [D, B, N+1]: x[i-1, j-1] along each diagonal

    def shift(v):  # v[i-1] at i; +inf at row 0
        return jnp.concatenate([jnp.full((batch, 1), inf), v[:, :-1]], axis=1)

    def fill(carry, step):
        before, last = carry  # diagonals d-2 and d-1
        x, ok = step
        c0, c1, c2 = shift(before), shift(last), last  # (i-1, j-1), (i-1, j), (i, j-1)
        take0 = (c0 < c1) & (c0 < c2)
        take1 = ~take0 & (c1 < c0) & (c1 < c2)
        c = jnp.where(take0, c0, jnp.where(take1, c1, c2))
        trace = jnp.where(take0, 0, jnp.where(take1, 1, 2)).astype(jnp.int8)
        cost = jnp.where(ok[None, :], -x + c, inf)
        return (last, cost), trace

    start = jnp.full((batch, n_max + 1), inf).at[:, 0].set(0.0)  # diagonal 0: cost[0, 0] = 0
    _, traces = jax.lax.scan(fill, (jnp.full((batch, n_max + 1), inf), start), (skewed, inside))

    rows = jnp.arange(batch)

    def walk(carry, _):
        r, c, first = carry  # current cell (r, c) of the cost table
        active = (r > 0) | (c > 0)
        # the path cell is (r - 1, c - 1) of the matrix; keep the earliest column seen in each row
        seen = jnp.where(active & (r > 0), c - 1, t_max)
        first = first.at[rows, jnp.clip(r - 1, 0, n_max - 1)].min(seen)
        t = traces[jnp.clip(r + c - 1, 0, traces.shape[0] - 1), rows, r]
        t = jnp.where(r == 0, 2, jnp.where(c == 0, 1, t))  # the boundary, as CTranslate2 sets it
        r = jnp.where(active & (t != 2), r - 1, r)
        c = jnp.where(active & (t != 1), c - 1, c)
        return (r, c, first), None

    init = (n_rows.astype(jnp.int32), n_frames.astype(jnp.int32), jnp.full((batch, n_max), t_max, jnp.int32))
    (_, _, first), _ = jax.lax.scan(walk, init, None, length=n_max + t_max)
    return first


# -- on the host -----------------------------------------------------------------------------------

@dataclasses.dataclass
class WordTiming:
    word: str  # as decoded, with its leading space ("" once merged into a neighbour)
    start: float  # seconds
    end: float
    probability: float  # mean probability of its tokens in the alignment pass
    tokens: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WindowWords:
    """One window's words, window-relative, after Whisper's window-level heuristics.

    ``timings`` keeps the empty entries punctuation merging leaves behind (their tokens moved to a
    neighbour), as openai-whisper and faster-whisper do: handing words to segments counts tokens."""

    timings: list[WordTiming]
    median_duration: float
    max_duration: float
    silences: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # window-relative pauses

    @property
    def words(self) -> list[WordTiming]:
        return [w for w in self.timings if w.word]


def _decode(tokenizer, tokens: Sequence[int]) -> str:
    """Text of ``tokens`` (special ids as nothing), partial UTF-8 sequences as U+FFFD."""
    return tokenizer.decode([t for t in tokens if not tokenizer.is_timestamp(t)])


def split_tokens_on_unicode(tokenizer, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
    """Split wherever the tokens so far decode to whole code points."""
    full = _decode(tokenizer, tokens)
    replacement = "\ufffd"
    words, word_tokens, current, offset = [], [], [], 0
    for token in tokens:
        current.append(token)
        decoded = _decode(tokenizer, current)
        bad = decoded.find(replacement)
        if bad < 0 or (offset + bad < len(full) and full[offset + bad] == replacement):
            words.append(decoded)
            word_tokens.append(current)
            current = []
            offset += len(decoded)
    return words, word_tokens


def split_to_word_tokens(tokenizer, tokens: list[int], language: str | None) -> tuple[list[str], list[list[int]]]:
    """Whisper's words: pieces that start with a space (or are punctuation, or special tokens) begin
    a new word; for languages written without spaces every whole code point is a word."""
    subwords, subword_tokens = split_tokens_on_unicode(tokenizer, tokens)
    if language in UNICODE_SPLIT_LANGUAGES:
        return subwords, subword_tokens
    words: list[str] = []
    word_tokens: list[list[int]] = []
    for subword, pieces in zip(subwords, subword_tokens):
        special = pieces[0] >= tokenizer.eot
        if special or subword.startswith(" ") or subword.strip() in string.punctuation or not words:
            words.append(subword)
            word_tokens.append(list(pieces))
        else:
            words[-1] += subword
            word_tokens[-1].extend(pieces)
    return words, word_tokens


def find_words(tokenizer, text_tokens: list[int], first_positions, token_probs, language: str | None) -> list[WordTiming]:
    """Words of ``text_tokens`` and their window-relative times from the DTW's first position of
    each row (``first_positions``: n_text + 1 values, the last one the end of the text) and the
    text tokens' probabilities."""
    if not text_tokens:
        return []
    words, word_tokens = split_to_word_tokens(tokenizer, list(text_tokens) + [tokenizer.eot], language)
    if len(word_tokens) <= 1:
        return []
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    jump_times = np.asarray(first_positions[: len(text_tokens) + 1], np.float64) / TOKENS_PER_SECOND
    probs = np.asarray(token_probs[: len(text_tokens)], np.float64)
    starts, ends = jump_times[boundaries[:-1]], jump_times[boundaries[1:]]
    return [
        WordTiming(word, float(start), float(end), float(np.mean(probs[i:j])), tokens)
        for word, tokens, start, end, i, j in zip(words, word_tokens, starts, ends, boundaries[:-1], boundaries[1:])
    ]


def merge_punctuations(timings: list[WordTiming], prepended: str = PREPEND_PUNCTUATIONS,
                       appended: str = APPEND_PUNCTUATIONS) -> None:
    """Attach opening punctuation to the following word and closing punctuation to the previous
    one (in place; the emptied entries stay, with no tokens)."""
    i, j = len(timings) - 2, len(timings) - 1
    while i >= 0:
        previous, following = timings[i], timings[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word, previous.tokens = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(timings):
        previous, following = timings[i], timings[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word, following.tokens = "", []
        else:
            i = j
        j += 1


def silent_runs(audio: np.ndarray, min_s: float = SILENCE_MIN_S, floor_db: float = SILENCE_DB) -> list[tuple[float, float]]:
    """Pauses in a window's audio: (start, end) seconds of every run of at least ``min_s`` of 20 ms
    frames whose level is ``floor_db`` or more below the window's 95th percentile frame level."""
    hop = SAMPLE_RATE // TOKENS_PER_SECOND  # 320 samples: one audio position of the encoder
    frames = len(audio) // hop
    if frames == 0:
        return []
    power = np.mean(np.square(np.asarray(audio[:frames * hop], np.float64).reshape(frames, hop)), axis=1)
    level = 10 * np.log10(power + 1e-20)
    silent = np.concatenate([[False], level < np.percentile(level, 95) + floor_db, [False]])
    edges = np.flatnonzero(np.diff(silent.astype(np.int8)))
    runs = []
    for start, end in zip(edges[::2], edges[1::2]):
        if end - start >= round(min_s * TOKENS_PER_SECOND):
            runs.append((start / TOKENS_PER_SECOND, end / TOKENS_PER_SECOND))
    return runs


def trim_silence(words: list[WordTiming], silences: list[tuple[float, float]], offset: float = 0.0) -> None:
    """Take pauses (window-relative, shifted by ``offset``) off the words' edges, in place (see the
    module's docstring)."""
    for word in words:
        for a, b in silences:
            a, b = offset + a, offset + b
            if b <= word.start or a >= word.end:
                continue
            if a <= word.start and b >= word.end:  # wholly silent: to the nearer edge
                edge = a if word.start - a <= b - word.end else b
                word.start = word.end = round(float(edge), 2)
            elif a <= word.start:
                word.start = round(float(b), 2)
            elif b >= word.end:
                word.end = round(float(a), 2)


def window_words(timings: list[WordTiming], silences: list[tuple[float, float]] | None = None) -> WindowWords:
    """Whisper's window-level heuristics on :func:`find_words`' output: the median word duration
    (capped at 0.7 s) and twice it as the longest plausible word; a word longer than that next to
    a sentence end is cut to it; then punctuation is merged.  Then the words are trimmed off the
    window's ``silences`` (:func:`silent_runs`)."""
    durations = np.array([w.end - w.start for w in timings])
    durations = durations[durations.nonzero()]
    median = min(MAX_MEDIAN_DURATION, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for k in range(1, len(timings)):
            if timings[k].end - timings[k].start > longest:
                if timings[k].word in SENTENCE_END_MARKS:
                    timings[k].end = timings[k].start + longest
                elif timings[k - 1].word in SENTENCE_END_MARKS:
                    timings[k].start = timings[k].end - longest
    merge_punctuations(timings)
    silences = list(silences or [])
    trim_silence([t for t in timings if t.word], silences)
    return WindowWords(timings, median, longest, silences)


@dataclasses.dataclass
class SegmentSpan:
    """What :func:`segment_words` needs of a segment: its times and how many text tokens it has."""

    start: float
    end: float
    n_tokens: int


def segment_words(window: WindowWords, segments: list[SegmentSpan], offset: float,
                  last_speech: float) -> tuple[list[list[WordTiming]], float]:
    """Give the window's words to its segments (in order, by token count) as absolute times
    (``offset`` + window time, rounded to 10 ms), with Whisper's heuristics: the first word after a
    pause longer than four median words is cut to the longest plausible word, and a first (last)
    word reaching more than 0.5 s before (after) its segment's timestamp is cut back to it.

    Then the rules added here: the words are trimmed off the window's silences again (the
    heuristics may have moved an edge back into one); every word starts no earlier than the
    previous word ends (since ``last_speech``, the end of the previous window's speech), so words
    are ordered and never overlap; and each segment's ``start``/``end`` become its first word's
    start and last word's end (Whisper does this too, except where the two heuristics above keep a
    segment timestamp), so every word lies inside its segment.  Segments are updated in place;
    returns each segment's words and the new ``last_speech``.
    """
    median, longest = window.median_duration, window.max_duration
    timings = window.timings
    out: list[list[WordTiming]] = []
    index = 0
    previous_end = last_speech
    for segment in segments:
        saved = 0
        words: list[WordTiming] = []
        while index < len(timings) and saved < segment.n_tokens:
            timing = timings[index]
            if timing.word:
                words.append(WordTiming(timing.word, round(offset + timing.start, 2), round(offset + timing.end, 2),
                                        timing.probability, list(timing.tokens)))
            saved += len(timing.tokens)
            index += 1
        if words:
            first = words[0]
            if first.end - last_speech > median * 4 and (
                    first.end - first.start > longest
                    or (len(words) > 1 and words[1].end - first.start > longest * 2)):
                if len(words) > 1 and words[1].end - words[1].start > longest:
                    boundary = max(words[1].end / 2, words[1].end - longest)
                    first.end = words[1].start = boundary
                first.start = max(0.0, first.end - longest)
            if segment.start < first.end and segment.start - 0.5 > first.start:
                first.start = max(0.0, min(first.end - median, segment.start))
            last = words[-1]
            if segment.end > last.start and segment.end + 0.5 < last.end:
                last.end = max(last.start + median, segment.end)
            trim_silence(words, window.silences, offset)
            for word in words:  # ordered, never overlapping; 10 ms steps (the heuristics' are not)
                word.start = round(max(word.start, previous_end), 2)
                word.end = round(max(word.end, word.start), 2)
                previous_end = word.end
            segment.start, segment.end = words[0].start, words[-1].end
            last_speech = segment.end
        out.append(words)
    return out, last_speech
