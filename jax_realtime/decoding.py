"""Whisper's decoding rules: logit filters, the greedy step and the decode state.

Pure functions of arrays; ``engine.py`` runs them inside its compiled ``lax.while_loop``.
The rules are those of openai-whisper and CTranslate2 (the reference for tokens here):

* ``suppress_tokens`` everywhere, ``suppress_blank`` (space, end of text) at the first sampled
  position;
* with timestamps: no ``<|notimestamps|>``; the first token is a timestamp no later than
  ``max_initial_timestamp``; timestamps come in pairs except right before end of text; they never
  decrease, and after text they increase (CTranslate2 since PR #1174, openai-whisper); and a timestamp is forced when the summed probability of all timestamp tokens beats
  every single text token.

Host-side helpers turn sampled ids back into segments.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .audio import TIME_PRECISION
from .thresholds import COMPRESSION_RATIO_THRESHOLD, MAX_TOKENS_PER_SECOND, TOKEN_SLACK  # noqa: F401 (re-exported)
from .tokenizer import WhisperTokenizer

MAX_INITIAL_TIMESTAMP = 1.0  # seconds (index 50)


def too_dense(n_text: int, seconds: float) -> bool:
    """More text than any speaker fits into ``seconds`` of audio."""
    return n_text > MAX_TOKENS_PER_SECOND * seconds + TOKEN_SLACK


@dataclasses.dataclass(frozen=True)
class DecodingIds:
    """The ids the filters need, fixed per model (static inside the compiled function)."""

    n_vocab: int
    eot: int
    sot: int
    no_speech: int
    no_timestamps: int
    timestamp_begin: int
    suppress: tuple[int, ...]
    suppress_blank: tuple[int, ...]
    language_ids: tuple[int, ...]  # empty for English-only models
    max_initial_timestamp_index: int = round(MAX_INITIAL_TIMESTAMP / TIME_PRECISION)

    @classmethod
    def from_tokenizer(cls, tokenizer: WhisperTokenizer, n_vocab: int) -> "DecodingIds":
        return cls(
            n_vocab=n_vocab,
            eot=tokenizer.eot,
            sot=tokenizer.sot,
            no_speech=tokenizer.no_speech,
            no_timestamps=tokenizer.no_timestamps,
            timestamp_begin=tokenizer.timestamp_begin,
            suppress=tokenizer.suppress_tokens,
            suppress_blank=tokenizer.suppress_blank,
            language_ids=tuple(tokenizer.language_ids.values()),
        )

    def mask(self, ids) -> np.ndarray:
        m = np.zeros(self.n_vocab, bool)
        m[list(ids)] = True
        return m


class History(NamedTuple):
    """Per row, what the rules need to know of the tokens sampled so far (a forced prefix counts
    as sampled, so decoding can continue an earlier output)."""

    count: jax.Array  # [B] tokens so far
    last: jax.Array  # [B] the last token (-1 before any)
    penultimate: jax.Array  # [B] the one before (the last one again while count < 2, as CTranslate2 reads it)
    last_timestamp: jax.Array  # [B] the latest timestamp token, -1 before any

    @staticmethod
    def of_prefix(prefix, timestamp_begin: int) -> tuple[int, int, int, int]:
        """(count, last, penultimate, last_timestamp) after ``prefix`` (host side)."""
        last = prefix[-1] if prefix else -1
        penultimate = prefix[-2] if len(prefix) >= 2 else last
        stamps = [t for t in prefix if t >= timestamp_begin]
        return len(prefix), last, penultimate, stamps[-1] if stamps else -1

    def advance(self, token, timestamp_begin: int) -> "History":
        return History(
            count=self.count + 1,
            last=token,
            penultimate=jnp.where(self.count == 0, token, self.last),
            last_timestamp=jnp.where(token >= timestamp_begin, token, self.last_timestamp),
        )


class DecodeState(NamedTuple):
    """What the greedy loop carries from one step to the next (fixed shapes)."""

    step: jax.Array  # scalar: tokens sampled by this loop (the same for every row)
    tokens: jax.Array  # [B, max_steps] sampled ids; end of text after a row finishes
    logits: jax.Array  # [B, V] logits for the next token
    done: jax.Array  # [B] bool
    sum_logprob: jax.Array  # [B]
    history: History
    cache: tuple  # the decoder's self-attention cache


def apply_filters(logits, history: History, timestamps, ids: DecodingIds):
    """Whisper's logit filters for one step. ``timestamps`` ([B] bool) selects timestamp mode."""
    neg = -jnp.inf
    vocab = jnp.arange(ids.n_vocab)
    is_ts = vocab >= ids.timestamp_begin
    is_text = vocab < ids.timestamp_begin  # everything that is not a timestamp, as the rules use it
    first = (history.count == 0)[:, None]

    logits = jnp.where(ids.mask(ids.suppress)[None, :], neg, logits)
    logits = jnp.where(first & ids.mask(ids.suppress_blank)[None, :], neg, logits)

    # --- timestamp rules (rows in timestamp mode only) ---
    disable = jnp.broadcast_to(vocab == ids.no_timestamps, logits.shape)
    # first token: a timestamp, at most max_initial_timestamp
    disable |= first & (is_text | (vocab > ids.timestamp_begin + ids.max_initial_timestamp_index))[None, :]
    # later tokens: pairs, except directly before end of text
    started = history.count > 0
    last_is_ts = started & (history.last >= ids.timestamp_begin)
    penultimate_is_ts = history.penultimate >= ids.timestamp_begin
    after_pair = last_is_ts & penultimate_is_ts  # a pair is closed: text must follow
    after_single = last_is_ts & ~penultimate_is_ts  # a pair is open: no ordinary text
    disable |= after_pair[:, None] & is_ts[None, :]
    disable |= after_single[:, None] & (vocab < ids.eot)[None, :]
    # timestamps never decrease, and after text they increase (no zero-length segment); only
    # the timestamp closing a segment may repeat the one that opened it
    ts = history.last_timestamp[:, None]
    lowest = ts + jnp.where(after_single, 0, 1)[:, None]
    disable |= started[:, None] & (ts >= 0) & is_ts[None, :] & (vocab[None, :] < lowest)
    logits = jnp.where(timestamps[:, None] & disable, neg, logits)
    # force a timestamp when all timestamps together are likelier than any text token
    check = timestamps & started & ~after_pair
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    ts_logprob = jax.nn.logsumexp(jnp.where(is_ts[None, :], logprobs, neg), axis=-1)
    text_max = jnp.max(jnp.where(is_text[None, :], logprobs, neg), axis=-1)
    force_ts = check & (ts_logprob > text_max)
    return jnp.where(force_ts[:, None] & is_text[None, :], neg, logits)


def greedy_step(state: DecodeState, timestamps, max_new, ids: DecodingIds, temperature=None, seed=None):
    """Pick the next token of every row; finished rows keep emitting end of text.

    ``max_new`` ([B]) is how many tokens this loop may sample for each row.  Rows with a
    ``temperature`` above 0 sample from ``softmax(logits / temperature)`` with a key derived from
    their ``seed`` and the step; the others (and every row when ``temperature`` is None) take the
    argmax.  The log-probability kept is that of the filtered logits at temperature 1, as in
    openai-whisper.
    """
    logits = apply_filters(state.logits, state.history, timestamps, ids)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if temperature is None:
        token = greedy
    else:
        def sample(_):
            keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), state.step))(seed)
            scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
            drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
            return jnp.where(temperature > 0, drawn, greedy)

        token = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
    token_logprob = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    token = jnp.where(state.done, ids.eot, token)
    sum_logprob = state.sum_logprob + jnp.where(state.done, 0.0, token_logprob)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
    done = state.done | (token == ids.eot) | (state.step + 1 >= max_new)
    return token, state._replace(
        step=state.step + 1, tokens=tokens, done=done, sum_logprob=sum_logprob,
        history=state.history.advance(token, ids.timestamp_begin),
    )


# -- host side -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Segment:
    start: float  # seconds from the start of the window
    end: float
    tokens: list[int]  # text tokens only
    text: str
    complete: bool = True  # False: text after the last timestamp pair, cut off by the window
    raw: list[int] = dataclasses.field(default_factory=list)  # the segment's ids, timestamps included


def split_segments(tokens: list[int], tokenizer: WhisperTokenizer, duration_s: float) -> tuple[list[Segment], float]:
    """Split timestamp-mode output of one window into segments, as openai-whisper/faster-whisper do.

    Returns the segments and ``seek_s``, where the next window should start: the window's end
    when the output closed with a single timestamp (all audio decoded) or had no timestamp pair,
    otherwise the last closed timestamp.  Text after that point comes back as a last segment
    with ``complete=False``: long-form decoding drops it and decodes it again from ``seek_s``.
    """
    segments, seek_s = _split(tokens, tokenizer, duration_s)
    for s in segments:  # the model may place a closing timestamp past the end of the audio
        s.start, s.end = min(s.start, duration_s), min(s.end, duration_s)
    return segments, min(seek_s, duration_s)


def _split(tokens: list[int], tokenizer: WhisperTokenizer, duration_s: float) -> tuple[list[Segment], float]:
    begin = tokenizer.timestamp_begin
    single_ending = len(tokens) >= 2 and tokens[-2] < begin <= tokens[-1]
    consecutive = [i for i in range(1, len(tokens)) if tokens[i] >= begin and tokens[i - 1] >= begin]
    if not consecutive:
        stamps = [t for t in tokens if t >= begin]
        end = duration_s
        if stamps and stamps[-1] != begin:
            end = tokenizer.timestamp_seconds(stamps[-1])
        return [s for s in [_segment(tokens, 0.0, end, tokenizer)] if s.tokens], duration_s
    slices = consecutive + ([len(tokens)] if single_ending else [])
    segments, last = [], 0
    for current in slices:
        part = tokens[last:current]
        start, end = tokenizer.timestamp_seconds(part[0]), tokenizer.timestamp_seconds(part[-1])
        segments.append(_segment(part, start, end, tokenizer))
        last = current
    if single_ending:
        seek_s = duration_s
    else:
        seek_s = tokenizer.timestamp_seconds(tokens[last - 1])
        tail = _segment(tokens[last:], seek_s, duration_s, tokenizer, complete=False)
        segments.append(tail)
    return [s for s in segments if s.tokens], seek_s


def _segment(part: list[int], start: float, end: float, tokenizer: WhisperTokenizer, complete: bool = True) -> Segment:
    text_tokens = [t for t in part if not tokenizer.is_timestamp(t)]
    return Segment(start, max(start, end), text_tokens, tokenizer.decode(text_tokens), complete, list(part))


def compression_ratio(text: str) -> float:
    """gzip compression ratio of the text: high values mean repetitive output (Whisper: > 2.4)."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0
