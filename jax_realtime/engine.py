"""The engine: Whisper compiled for a fixed set of shapes, batched and sharded.

This is the only module that calls ``jax.jit``.  One function per shape bucket runs everything
the device does for a batch of windows: log-mel -> encoder -> cross-attention keys/values ->
language detection (multilingual models) -> prompt prefill -> greedy decoding in a
``lax.while_loop`` that stops as soon as every row has finished.

A bucket is ``(batch, window seconds, prompt length)``.  All buckets are compiled ahead of time
by :meth:`Engine.warmup`; afterwards a call is padded up to a bucket and runs a compiled
executable, so nothing compiles while serving.  Every XLA compilation in the process is counted
(:func:`compile_stats`) so tests and operators can check that.

Many processes (``jax.distributed``, e.g. the hosts of a TPU pod): the mesh spans every device of
every process, and each process calls :meth:`Engine.decode` with its own requests (possibly none).
The processes agree on the sequence of compiled calls (window, batch and prompt bucket) with a
small all-gather before each, pad their missing rows, contribute their rows of the global batch,
and get back their own results.  The code path is the same on one process, where agreeing needs
no communication; every process must call ``decode`` the same number of times.

Word-level timestamps (``EngineConfig.word_timestamps``; the method is in ``alignment.py``): two
more compiled functions per bucket ``(batch, window seconds, alignment token length)``, compiled at
warm-up only when enabled.  ``_align_bucket`` takes a batch's cross-attention keys/values, runs
the decoder once over each row's text for the alignment heads' cross-attention, and the DTW, all
on the device.  A decode whose requests ask for words (``DecodeRequest.word_timestamps``) keeps
its keys/values on the device (the decode function then returns them too) and hands them
straight to ``_align_bucket``: no second encoder pass.  :meth:`Engine.align` aligns given tokens
to given audio (a realtime session's committed text); it encodes with ``_encode_bucket`` first.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections import Counter
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import alignment, sharding
from .alignment import WindowWords
from .audio import CHUNK_LENGTH, HOP_LENGTH, SAMPLE_RATE, TOKENS_PER_SECOND, log_mel_spectrogram, window_samples
from .config import EngineConfig
from .decoding import (
    COMPRESSION_RATIO_THRESHOLD,
    too_dense,
    DecodeState,
    DecodingIds,
    History,
    Segment,
    compression_ratio,
    greedy_step,
    split_segments,
)
from .model import Whisper, empty_cache
from .tokenizer import LANGUAGES, WhisperTokenizer
from .weights import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

# -- compilation accounting ------------------------------------------------------------------------

MAX_TEMPERATURE = 2.0

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_stats: Counter = Counter()
_stats_lock = threading.Lock()


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _BACKEND_COMPILE_EVENT:
        with _stats_lock:
            _stats["compilations"] += 1
            _stats["compile_seconds"] += duration


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:
        with _stats_lock:
            _stats["cache_hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def compile_stats() -> dict:
    """Process-wide XLA compilations: ``compilations`` (every executable built, including those
    served from the persistent cache), ``cache_hits`` and ``compile_seconds``."""
    with _stats_lock:
        return {"compilations": _stats["compilations"], "cache_hits": _stats["cache_hits"],
                "compile_seconds": _stats["compile_seconds"]}


def enable_compilation_cache(directory: str) -> None:
    """Turn on JAX's persistent compilation cache for every program, however quick to compile."""
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# -- requests and results --------------------------------------------------------------------------

@dataclasses.dataclass
class DecodeRequest:
    """One window of audio (16 kHz mono float32, at most 30 s) and how to decode it."""

    audio: np.ndarray
    language: str | None = None  # ISO code; None: detect (multilingual) / English (English-only)
    task: str = "transcribe"
    timestamps: bool = False
    prompt: Sequence[int] = ()  # previous text tokens, conditioning the decoder (<|startofprev|>)
    prefix: Sequence[int] = ()  # the output must start with these (timestamps included); decoding continues them
    max_new_tokens: int | None = None  # stop after this many sampled tokens (Whisper's own limits still apply)
    temperature: float = 0.0  # 0: greedy; above: sample from softmax(logits / temperature)
    seed: int = 0  # for sampling: the same request, seed and temperature give the same output
    min_window_s: float = 0.0  # decode in a window at least this long (fallback from short windows)
    word_timestamps: bool = False  # also align the output's words (needs EngineConfig.word_timestamps)


@dataclasses.dataclass
class DecodeResult:
    tokens: list[int]  # the window's output: prefix + sampled ids, without end of text (timestamps included)
    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    hit_token_limit: bool  # stopped at Whisper's token limit for a window, not at end of text
    truncated: bool  # stopped at the request's max_new_tokens
    duration_s: float  # audio in the request
    window_s: float  # the encoder window it was decoded in
    prompt_tokens: int  # tokens before the first sampled one (previous text, start sequence, prefix)
    sampled_tokens: int  # tokens this call generated (end of text included when reached)
    temperature: float
    segments: list[Segment]  # timestamp mode: the window's segments; else one segment
    seek_s: float  # timestamp mode: where the next window should start
    # word_timestamps: the words of the complete segments (window-relative; alignment.segment_words
    # hands them to segments)
    words: WindowWords | None = None


@dataclasses.dataclass
class AlignRequest:
    """Words of given tokens in given audio (:meth:`Engine.align`): a window's audio (at most 30 s)
    and its text, e.g. a realtime session's committed tokens (a decode's prefix + sampled tokens).
    Timestamp and special tokens are dropped; the previous-text prompt is not part of alignment."""

    audio: np.ndarray
    tokens: Sequence[int]
    language: str | None = None  # None: English (English-only models); multilingual models need one
    task: str = "transcribe"
    min_window_s: float = 0.0


@dataclasses.dataclass(frozen=True, order=True)
class AlignBucket:
    batch: int
    window_s: float
    tokens: int  # the alignment sequence's length (start sequence, <|notimestamps|>, text, end of text)


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    batch: int
    window_s: float
    prompt_len: int


@dataclasses.dataclass
class _Prepared:
    request: DecodeRequest
    tokens: list[int]  # initial tokens (a -1 marks the language slot to detect)
    prefix: list[int]
    sot_index: int
    language_index: int  # -1 when the model has no language slot
    window_s: float


@dataclasses.dataclass
class _AlignJob:
    tokens: list[int]  # text tokens
    language: str
    task: str
    samples: int  # audio samples in the window
    audio: np.ndarray  # the window's audio (its pauses)


def looks_degenerate(result: DecodeResult) -> bool:
    """Output that a short window may have caused: Whisper looping on a clause.

    Signs: no end of text before the token limit, gzip compression ratio above 2.4 (Whisper's own
    threshold), or more than 6 text tokens per second of audio plus 4.
    """
    n_text = sum(len(segment.tokens) for segment in result.segments)
    return (result.hit_token_limit or result.compression_ratio > COMPRESSION_RATIO_THRESHOLD
            or too_dense(n_text, result.duration_s))


# -- the engine ----------------------------------------------------------------------------------

class Engine:
    """Whisper on every local device, compiled for ``config``'s buckets."""

    def __init__(self, config: EngineConfig | None = None, checkpoint: Checkpoint | None = None, devices=None):
        self.config = config or EngineConfig()
        if self.config.compilation_cache:
            enable_compilation_cache(os.path.join(self.config.cache_dir, "xla"))
        else:  # the setting is process-wide: an earlier engine may have turned it on
            jax.config.update("jax_enable_compilation_cache", False)
        started = time.perf_counter()
        ckpt = checkpoint or load_checkpoint(self.config.model, self.config.cache_dir)
        self.name = ckpt.name
        self.dims = ckpt.dims
        self.tokenizer = WhisperTokenizer(ckpt.tokenizer_file, self.dims.multilingual)
        self.ids = DecodingIds.from_tokenizer(self.tokenizer, self.dims.n_vocab)
        self.dtype = jnp.dtype(self.config.dtype)
        self.model = Whisper(self.dims, self.dtype)
        self.mesh = sharding.make_mesh(devices, self.config.model_parallelism)
        # The decoder's output projection is the token embedding transposed; a row-major copy
        # (kept beside the parameters, ~vocab x d more memory) makes every decoding step faster.
        projection = np.ascontiguousarray(ckpt.params["decoder"]["embed_tokens"]["embedding"].T)
        self.weights = sharding.put_params({"params": ckpt.params, "projection": projection}, self.mesh, self.dtype)
        self.load_seconds = time.perf_counter() - started

        n_data = sharding.data_parallelism(self.mesh)
        if sharding.local_data_parallelism(self.mesh) == 0:
            raise ValueError(f"process {jax.process_index()} has no device in the engine's mesh")
        # one CPU device per process (one machine, or each host of a CPU cluster): see EngineConfig
        on_one_cpu = sharding.local_data_parallelism(self.mesh) == 1 and self.mesh.devices.flat[0].platform == "cpu"
        self.encoder_rows = self.config.encoder_rows or (1 if on_one_cpu else None)
        self.batch_buckets = tuple(sorted({-(-b // n_data) * n_data for b in self.config.batch_buckets}))
        self.window_buckets = self.config.window_buckets
        self.prompt_buckets = self.config.prompt_buckets
        self.max_steps = self.dims.max_new_tokens
        # Whisper's longest prompt for this model: previous text (max_new_tokens - 1) + <|startofprev|>
        # + the start sequence with <|notimestamps|> (228 for multilingual models, 226 English-only);
        # a forced prefix (< max_new_tokens) after the start sequence is shorter
        self._longest_prompt = self.max_steps + len(self.tokenizer.sot_sequence(None, "transcribe")) + 1
        if max(self.prompt_buckets) < self._longest_prompt:  # a config built without validation
            raise ValueError(f"prompt_buckets: the largest bucket ({max(self.prompt_buckets)}) must hold this model's "
                             f"longest prompt, {self._longest_prompt} tokens")
        self._executables: dict[Bucket, jax.stages.Compiled] = {}
        self._compile_lock = threading.Lock()
        batch_spec = sharding.batch_sharded(self.mesh)
        param_spec = jax.tree_util.tree_map(lambda x: x.sharding, self.weights)
        # with word timestamps on, the decode function also returns the cross-attention keys/values
        # (left on the device) for the alignment of the same batch
        self.word_timestamps = self.config.word_timestamps
        self._jitted = jax.jit(
            functools.partial(self._run_bucket, keep_cross=self.word_timestamps),
            in_shardings=(param_spec,) + (batch_spec,) * 10,
            out_shardings=batch_spec,
        )
        self.alignment_heads, self.alignment_heads_source = alignment.alignment_heads(
            self.name, os.path.dirname(ckpt.tokenizer_file), self.dims.n_text_layer, self.dims.n_text_head)
        self.sot_length = len(self.tokenizer.sot_sequence("en" if self.dims.multilingual else None, "transcribe"))
        self.word_token_buckets = self.config.word_token_buckets
        self._align_executables: dict[AlignBucket, jax.stages.Compiled] = {}
        self._encode_executables: dict[tuple[int, float], jax.stages.Compiled] = {}
        if self.word_timestamps:
            self._align_jitted = jax.jit(self._align_bucket, in_shardings=(param_spec,) + (batch_spec,) * 4,
                                         out_shardings=batch_spec)
            self._encode_jitted = jax.jit(self._encode_bucket, in_shardings=(param_spec, batch_spec),
                                          out_shardings=batch_spec)

    # -- buckets ---------------------------------------------------------------------------------
    @property
    def buckets(self) -> list[Bucket]:
        return [Bucket(b, w, p) for b, w, p in itertools.product(self.batch_buckets, self.window_buckets, self.prompt_buckets)]

    @property
    def align_buckets(self) -> list[AlignBucket]:
        """The word alignment buckets (none unless ``word_timestamps`` is on)."""
        if not self.word_timestamps:
            return []
        return [AlignBucket(b, w, t) for b, w, t in
                itertools.product(self.batch_buckets, self.window_buckets, self.word_token_buckets)]

    def warmup(self, buckets: Sequence[Bucket] | None = None) -> float:
        """Compile every bucket, or only ``buckets`` (from the persistent cache where possible);
        returns seconds.  A bucket not compiled here is compiled when a call first needs it.  With
        word timestamps on, the alignment buckets of the same batch sizes and windows too."""
        started = time.perf_counter()
        for bucket in self.buckets if buckets is None else buckets:
            self._executable(bucket)
        shapes = None if buckets is None else {(b.batch, b.window_s) for b in buckets}
        for bucket in self.align_buckets:
            if shapes is not None and (bucket.batch, bucket.window_s) not in shapes:
                continue
            self._align_executable(bucket)
            self._encode_executable(bucket.batch, bucket.window_s)
        return time.perf_counter() - started

    def _compile(self, jitted, what, cache: dict, key, *args):
        with self._compile_lock:
            if key not in cache:
                started = time.perf_counter()
                # float32 means float32 on every backend: GPUs would otherwise use TF32 and TPUs
                # bfloat16 passes for float32 matrix products (CPUs compute float32 either way)
                precision = "highest" if self.dtype == jnp.float32 else "default"
                with jax.default_matmul_precision(precision):
                    cache[key] = jitted.lower(self.weights, *args).compile()
                log.info("compiled %s %s in %.1f s", what, key, time.perf_counter() - started)
            return cache[key]

    def _batch_args(self, shapes):
        return [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharded(self.mesh)) for shape, dtype in shapes]

    def _executable(self, bucket: Bucket):
        return self._compile(self._jitted, "decode", self._executables, bucket,
                             *self._batch_args(self._arg_shapes(bucket)))

    def _align_executable(self, bucket: AlignBucket):
        b, t = bucket.batch, bucket.tokens
        heads = self.dims.n_text_head
        kv = ((b, heads, round(bucket.window_s * TOKENS_PER_SECOND), self.dims.n_text_state // heads), self.dtype)
        cross = tuple(tuple(self._batch_args([kv, kv])) for _ in range(self.dims.n_text_layer))
        args = self._batch_args([((b, t), jnp.int32), ((b,), jnp.int32), ((b,), jnp.int32)])
        return self._compile(self._align_jitted, "alignment", self._align_executables, bucket, cross, *args)

    def _encode_executable(self, batch: int, window_s: float):
        shapes = [((batch, window_samples(window_s)), jnp.float32)]
        return self._compile(self._encode_jitted, "encoder", self._encode_executables, (batch, window_s),
                             *self._batch_args(shapes))

    def _arg_shapes(self, bucket: Bucket):
        b, p = bucket.batch, bucket.prompt_len
        return [
            ((b, window_samples(bucket.window_s)), jnp.float32),  # audio
            ((b, p), jnp.int32),  # initial tokens, left-padded
            ((b,), jnp.int32),  # start: first real slot of each row
            ((b,), jnp.int32),  # sot_index
            ((b,), jnp.int32),  # language_index (-1: none)
            ((b,), jnp.bool_),  # timestamps
            ((b,), jnp.int32),  # max_new tokens
            ((b, 4), jnp.int32),  # history of a forced prefix: count, last, penultimate, last timestamp
            ((b,), jnp.float32),  # temperature
            ((b,), jnp.uint32),  # seed
        ]

    # -- the compiled function -------------------------------------------------------------------
    def _encode(self, weights, audio):
        """log-mel and encoder of a batch of windows: the audio features [B, W·50, d]."""
        variables = {"params": weights["params"]}

        def encode(rows):
            return self.model.apply(variables, log_mel_spectrogram(rows, self.dims.n_mels), method=Whisper.encode)

        if self.encoder_rows and self.encoder_rows < audio.shape[0]:
            features = jax.lax.map(lambda row: encode(row[None])[0], audio, batch_size=self.encoder_rows)
        else:
            features = encode(audio)
        return sharding.constrain_batch(features, self.mesh)

    def _run_bucket(self, weights, audio, prompt, start, sot_index, language_index, timestamps, max_new, history,
                    temperature, seed, keep_cross=False):
        model, ids = self.model, self.ids
        variables, projection = {"params": weights["params"]}, weights["projection"]
        batch, prompt_len = prompt.shape
        rows = jnp.arange(batch)

        audio_features = self._encode(weights, audio)
        cross = model.apply(variables, audio_features, method=Whisper.cross_kv)

        if ids.language_ids:  # multilingual: fill an empty language slot with the detected language
            sot = jnp.full((batch, 1), ids.sot, jnp.int32)
            hidden, _ = model.apply(variables, sot, 0, jnp.zeros((batch,), jnp.int32),
                                    empty_cache(self.dims, batch, 1, self.dtype), cross, method=Whisper.decode)
            logits = model.apply(variables, hidden[:, 0], projection, method=Whisper.logits)
            language_ids = jnp.asarray(ids.language_ids, jnp.int32)
            detected = language_ids[jnp.argmax(logits[:, language_ids], axis=-1)]
            slot = jnp.arange(prompt_len)[None, :] == language_index[:, None]
            prompt = jnp.where(slot & (prompt < 0), detected[:, None], prompt)
        language = jnp.where(language_index >= 0, prompt[rows, jnp.maximum(language_index, 0)], -1)

        cache = empty_cache(self.dims, batch, prompt_len + self.max_steps, self.dtype)
        cache = jax.tree_util.tree_map(lambda c: sharding.constrain_batch(c, self.mesh), cache)
        hidden, cache = model.apply(variables, prompt, 0, start, cache, cross, method=Whisper.decode)
        at_sot = model.apply(variables, hidden[rows, sot_index], projection, method=Whisper.logits)
        no_speech_prob = jax.nn.softmax(at_sot, axis=-1)[:, ids.no_speech]

        state = DecodeState(
            step=jnp.int32(0),
            tokens=jnp.full((batch, self.max_steps), ids.eot, jnp.int32),
            logits=model.apply(variables, hidden[:, -1], projection, method=Whisper.logits),
            done=max_new <= 0,
            sum_logprob=jnp.zeros((batch,), jnp.float32),
            history=History(history[:, 0], history[:, 1], history[:, 2], history[:, 3]),
            cache=cache,
        )

        def cond(s: DecodeState):
            return (s.step < self.max_steps) & ~jnp.all(s.done)

        def body(s: DecodeState):
            token, s = greedy_step(s, timestamps, max_new, ids, temperature, seed)
            hidden, cache = model.apply(variables, token[:, None], prompt_len + s.step - 1, start, s.cache, cross,
                                        method=Whisper.decode)
            logits = model.apply(variables, hidden[:, 0], projection, method=Whisper.logits)
            return s._replace(logits=logits, cache=cache)

        final = jax.lax.while_loop(cond, body, state)
        out = {
            "tokens": final.tokens,
            "sum_logprob": final.sum_logprob,
            "no_speech_prob": no_speech_prob,
            "language": language,
        }
        if keep_cross:
            out["cross"] = cross
        return out

    def _encode_bucket(self, weights, audio):
        """The cross-attention keys/values of a batch of windows (for :meth:`align`)."""
        return self.model.apply({"params": weights["params"]}, self._encode(weights, audio), method=Whisper.cross_kv)

    def _align_bucket(self, weights, cross, tokens, n_tokens, n_frames):
        """Word alignment of a batch (see ``alignment.py``).  ``cross``: the windows' cross-attention
        keys/values; ``tokens`` [B, S]: per row the start sequence, ``<|notimestamps|>``, the text and
        end of text, then padding; ``n_tokens`` its real length, ``n_frames`` the real audio
        positions (of the window's T).  Returns per row the first audio position of each DTW row
        (``<|notimestamps|>`` and the text tokens) and each text token's probability (softmax over
        the text vocabulary, as CTranslate2's ``align``)."""
        model = self.model
        variables = {"params": weights["params"]}
        hidden, scores = model.apply(variables, tokens, cross, self.alignment_heads, method=Whisper.alignment_pass)
        sot, rows = self.sot_length, tokens.shape[1] - self.sot_length - 1
        n_text = n_tokens - sot - 2
        # position p predicts token p + 1: positions sot .. sot + rows - 2 predict the text tokens
        probs = self._text_probabilities(variables, hidden[:, sot:sot + rows - 1], weights["projection"],
                                         tokens[:, sot + 1:sot + rows], n_text)
        matrix = alignment.attention_matrix(scores, n_tokens, n_frames)[:, sot:sot + rows]
        first = alignment.dtw_first_positions(matrix, n_text + 1, n_frames)
        return {"first": first, "probs": probs}

    PROBABILITY_CHUNK = 16  # positions per output projection in _text_probabilities

    def _text_probabilities(self, variables, hidden, projection, targets, n_text):
        """Each target's probability under a softmax over the text vocabulary (below end of text).

        The output projection (vocabulary x positions: most of alignment's cost) runs on chunks of
        16 positions in a loop that stops after the batch's longest real text, so a token bucket
        longer than the text costs little here."""
        batch, length, _ = hidden.shape
        chunk = self.PROBABILITY_CHUNK
        padded = -(-length // chunk) * chunk
        hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
        targets = jnp.pad(jnp.clip(targets, 0, self.ids.eot - 1), ((0, 0), (0, padded - length)))
        text_projection = projection[:, :self.ids.eot]

        def body(c, probs):
            h = jax.lax.dynamic_slice_in_dim(hidden, c * chunk, chunk, axis=1)
            t = jax.lax.dynamic_slice_in_dim(targets, c * chunk, chunk, axis=1)
            logits = self.model.apply(variables, h, text_projection, method=Whisper.logits)
            logprobs = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
            return jax.lax.dynamic_update_slice_in_dim(probs, jnp.exp(logprobs), c * chunk, axis=1)

        n_chunks = (jnp.max(n_text) + chunk - 1) // chunk
        probs = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((batch, padded), jnp.float32))
        return probs[:, :length]

    # -- host side -------------------------------------------------------------------------------
    def window_for(self, request: DecodeRequest) -> float:
        """The encoder window (seconds) a request is decoded in; ValueError if it fits none."""
        audio = np.asarray(request.audio)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (1-D), got shape {audio.shape}")
        duration = len(audio) / SAMPLE_RATE
        if duration > CHUNK_LENGTH:
            raise ValueError(f"a request holds at most {CHUNK_LENGTH} s of audio, got {duration:.2f} s")
        needed = max(duration, request.min_window_s)
        for window in self.window_buckets:
            if window >= needed - 1e-9:
                return window
        raise ValueError(f"min_window_s {request.min_window_s:g} is longer than the largest window bucket "
                         f"({self.window_buckets[-1]:g} s)")

    def _prepare(self, request: DecodeRequest) -> _Prepared:
        window = self.window_for(request)
        if request.word_timestamps and not self.word_timestamps:
            raise ValueError("word timestamps are not enabled on this engine (EngineConfig.word_timestamps)")
        if request.max_new_tokens is not None and request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {request.max_new_tokens}")
        if not 0.0 <= request.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE}, not {request.temperature}")
        sot_sequence = self.tokenizer.sot_sequence(request.language, request.task)
        if not request.timestamps:
            sot_sequence.append(self.tokenizer.no_timestamps)
        previous: list[int] = []
        if request.prompt:
            room = min(self.dims.n_text_ctx // 2 - 1, max(self.prompt_buckets) - len(sot_sequence) - 1)
            room -= len(request.prefix)
            if room > 0:
                previous = [self.tokenizer.sot_prev] + [int(t) for t in request.prompt][-room:]
        prefix = [int(t) for t in request.prefix]
        if len(prefix) >= self.dims.max_new_tokens:
            raise ValueError(f"a prefix of {len(prefix)} tokens leaves no room in a window")
        tokens = previous + sot_sequence + prefix
        sot_index = len(previous)
        language_index = sot_index + 1 if self.dims.multilingual else -1
        return _Prepared(request, tokens, prefix, sot_index, language_index, window)

    def decode(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        """Decode windows of audio; results come back in the order of ``requests``.

        Requests are grouped by encoder window, cut into batches no larger than the largest batch
        bucket, and each batch is padded up to the smallest bucket that holds it.  A result from a
        window shorter than 30 s that looks degenerate (see :func:`looks_degenerate`) is decoded
        again in the next larger window, so short windows cost speed, never accuracy.

        Under ``jax.distributed`` every process calls this together, each with its own requests
        (an empty list is fine); see the module's docstring.
        """
        prepared = [self._prepare(r) for r in requests]
        results = self._decode_prepared(prepared)
        retry = [i for i, r in enumerate(results) if r.window_s < self.window_buckets[-1] and looks_degenerate(r)]
        while self.config.window_fallback and sharding.any_process(bool(retry)):
            for i in retry:  # each is in a window shorter than the largest (see ``retry``)
                prepared[i].window_s = min(w for w in self.window_buckets if w > prepared[i].window_s)
            for i, result in zip(retry, self._decode_prepared([prepared[i] for i in retry])):
                results[i] = result
            retry = [i for i in retry if results[i].window_s < self.window_buckets[-1] and looks_degenerate(results[i])]
        return results

    @property
    def local_capacity(self) -> int:
        """Rows of this process in a call of the largest batch bucket (all of them on one process)."""
        return sharding.local_batch(self.mesh, self.batch_buckets[-1])

    def _decode_prepared(self, prepared: list[_Prepared]) -> list[DecodeResult]:
        results: list[DecodeResult | None] = [None] * len(prepared)
        largest = self.local_capacity
        groups = [[i for i, p in enumerate(prepared) if p.window_s == window] for window in self.window_buckets]
        # every process makes as many calls per window as the process with the most requests needs
        calls = sharding.gather([-(-len(group) // largest) for group in groups]).max(axis=0)
        for window, group, n_calls in zip(self.window_buckets, groups, calls):
            for first in range(0, int(n_calls) * largest, largest):
                chunk = group[first:first + largest]
                for i, result in zip(chunk, self._decode_batch([prepared[i] for i in chunk], window)):
                    results[i] = result
        return results  # type: ignore[return-value]

    def _decode_batch(self, batch: list[_Prepared], window: float) -> list[DecodeResult]:
        """One compiled call; ``batch`` holds this process's rows (possibly none)."""
        longest = max((len(p.tokens) for p in batch), default=0)
        # explicit picks (never ``next()`` on a generator: a StopIteration escaping into the
        # batcher's executor would leave its future pending forever)
        batch_fits = [i for i, b in enumerate(self.batch_buckets) if sharding.local_batch(self.mesh, b) >= len(batch)]
        if not batch_fits:
            raise ValueError(f"{len(batch)} rows do not fit the largest batch bucket ({self.batch_buckets[-1]})")
        prompt_fits = [i for i, p in enumerate(self.prompt_buckets) if p >= longest]
        if not prompt_fits:
            raise ValueError(f"a prompt of {longest} tokens does not fit the largest prompt bucket "
                             f"({self.prompt_buckets[-1]}); prompt_buckets must include one of at least "
                             f"{self._longest_prompt} (see EngineConfig)")
        needed = [batch_fits[0], prompt_fits[0]]
        batch_index, prompt_index = sharding.gather(needed).max(axis=0)  # the same bucket on every process
        global_size, prompt_len = self.batch_buckets[batch_index], self.prompt_buckets[prompt_index]
        bucket = Bucket(global_size, window, prompt_len)
        size = sharding.local_batch(self.mesh, global_size)

        n_samples = window_samples(window)
        audio = np.zeros((size, n_samples), np.float32)
        prompt = np.full((size, prompt_len), self.ids.eot, np.int32)
        start = np.full((size,), prompt_len - 1, np.int32)
        sot_index = np.full((size,), prompt_len - 1, np.int32)
        language_index = np.full((size,), -1, np.int32)
        timestamps = np.zeros((size,), bool)
        max_new = np.zeros((size,), np.int32)  # padding rows are finished from the start
        history = np.tile(np.array([0, -1, -1, -1], np.int32), (size, 1))
        temperature = np.zeros((size,), np.float32)
        seed = np.zeros((size,), np.uint32)
        prompt[:, -1] = self.ids.sot
        for row, p in enumerate(batch):
            audio[row, : len(p.request.audio)] = p.request.audio
            offset = prompt_len - len(p.tokens)
            prompt[row, offset:] = p.tokens
            start[row] = offset
            sot_index[row] = offset + p.sot_index
            language_index[row] = offset + p.language_index if p.language_index >= 0 else -1
            timestamps[row] = p.request.timestamps
            # Whisper's budget is per window, prefix included; the text context bounds it too
            max_new[row] = self._budget(p)
            history[row] = History.of_prefix(p.prefix, self.ids.timestamp_begin)
            temperature[row] = p.request.temperature
            seed[row] = p.request.seed % 2**32

        executable = self._executable(bucket)
        args = sharding.put_batch([audio, prompt, start, sot_index, language_index, timestamps, max_new, history,
                                   temperature, seed], self.mesh, global_size)
        outputs = executable(self.weights, *args)
        cross = outputs.pop("cross", None)  # word timestamps on: stays on the device
        out = {key: sharding.local_rows(value) for key, value in outputs.items()}
        results = [self._result(p, out, row, int(max_new[row])) for row, p in enumerate(batch)]
        if cross is not None and sharding.any_process(any(p.request.word_timestamps for p in batch)):
            jobs = [_AlignJob(self._aligned_text(r), r.language, p.request.task, len(p.request.audio),
                              np.asarray(p.request.audio)) if p.request.word_timestamps else None
                    for p, r in zip(batch, results)]
            for result, words in zip(results, self._align_batch(jobs, cross, global_size, window)):
                result.words = words
        return results

    # -- word alignment ----------------------------------------------------------------------------
    @staticmethod
    def _aligned_text(result: DecodeResult) -> list[int]:
        """The text tokens Whisper aligns: those of the complete segments (in timestamp mode the text
        after the last timestamp pair is decoded again from there, so it is left out)."""
        return [t for s in result.segments if s.complete for t in s.tokens]

    def _alignment_sequence(self, job: "_AlignJob") -> list[int]:
        return (self.tokenizer.sot_sequence(job.language if self.dims.multilingual else None, job.task)
                + [self.tokenizer.no_timestamps] + job.tokens + [self.tokenizer.eot])

    def _align_batch(self, jobs: list["_AlignJob | None"], cross, global_size: int,
                     window: float) -> list[WindowWords | None]:
        """One compiled alignment call on a batch's cross-attention keys/values (rows without a job
        are padding)."""
        sequences = [None if job is None else self._alignment_sequence(job) for job in jobs]
        longest = max((len(s) for s in sequences if s is not None), default=0)
        needed = next(i for i, t in enumerate(self.word_token_buckets) if t >= longest)
        length = self.word_token_buckets[int(sharding.gather([needed]).max())]
        size = sharding.local_batch(self.mesh, global_size)
        positions = round(window * TOKENS_PER_SECOND)
        tokens = np.full((size, length), self.ids.eot, np.int32)
        n_tokens = np.full((size,), self.sot_length + 2, np.int32)  # padding: one DTW row, one position
        n_frames = np.ones((size,), np.int32)
        for row, (job, sequence) in enumerate(zip(jobs, sequences)):
            if job is not None:
                tokens[row, :len(sequence)] = sequence
                n_tokens[row] = len(sequence)
                n_frames[row] = min(max(job.samples // HOP_LENGTH // 2, 1), positions)
        executable = self._align_executable(AlignBucket(global_size, window, length))
        args = sharding.put_batch([tokens, n_tokens, n_frames], self.mesh, global_size)
        out = {key: sharding.local_rows(value) for key, value in executable(self.weights, cross, *args).items()}
        words: list[WindowWords | None] = []
        for row, job in enumerate(jobs):
            if job is None:
                words.append(None)
            elif not job.tokens or job.samples // HOP_LENGTH // 2 == 0:  # nothing to align, or no audio
                words.append(WindowWords([], 0.0, 0.0))
            else:
                n_text = len(job.tokens)
                timings = alignment.find_words(self.tokenizer, job.tokens, out["first"][row][:n_text + 1],
                                               out["probs"][row][:n_text], job.language)
                words.append(alignment.window_words(timings, alignment.silent_runs(job.audio)))
        return words

    def align(self, requests: Sequence[AlignRequest]) -> list[WindowWords]:
        """Word timestamps of given text in given audio, one :class:`AlignRequest` per window (the
        realtime path: a session's committed tokens).  Batched by encoder window like :meth:`decode`;
        under ``jax.distributed`` every process calls it together (possibly with no requests)."""
        if not self.word_timestamps:
            raise ValueError("word timestamps are not enabled on this engine (EngineConfig.word_timestamps)")
        jobs, windows = [], []
        for request in requests:
            windows.append(self.window_for(request))
            if self.dims.multilingual and request.language is None:
                raise ValueError("aligning on a multilingual model needs the language")
            self.tokenizer.sot_sequence(request.language, request.task)  # validates both
            language = request.language or "en"
            text = [int(t) for t in request.tokens if int(t) < self.ids.eot]
            job = _AlignJob(text, language, request.task, len(np.asarray(request.audio)), np.asarray(request.audio))
            if len(self._alignment_sequence(job)) > self.word_token_buckets[-1]:
                raise ValueError(f"{len(text)} text tokens do not fit the largest word_token_bucket "
                                 f"({self.word_token_buckets[-1]})")
            jobs.append(job)
        results: list[WindowWords | None] = [None] * len(jobs)
        largest = self.local_capacity
        groups = [[i for i, w in enumerate(windows) if w == window] for window in self.window_buckets]
        calls = sharding.gather([-(-len(group) // largest) for group in groups]).max(axis=0)
        for window, group, n_calls in zip(self.window_buckets, groups, calls):
            for first in range(0, int(n_calls) * largest, largest):
                chunk = group[first:first + largest]
                needed = next(i for i, b in enumerate(self.batch_buckets)
                              if sharding.local_batch(self.mesh, b) >= len(chunk))
                global_size = self.batch_buckets[int(sharding.gather([needed]).max())]
                size = sharding.local_batch(self.mesh, global_size)
                audio = np.zeros((size, window_samples(window)), np.float32)
                for row, i in enumerate(chunk):
                    audio[row, :jobs[i].samples] = jobs[i].audio
                (audio_arg,) = sharding.put_batch([audio], self.mesh, global_size)
                cross = self._encode_executable(global_size, window)(self.weights, audio_arg)
                padded = [jobs[i] for i in chunk] + [None] * (size - len(chunk))
                for i, words in zip(chunk, self._align_batch(padded, cross, global_size, window)):
                    results[i] = words
        return results  # type: ignore[return-value]

    def _whisper_budget(self, p: _Prepared) -> int:
        """Whisper's limit: 224 tokens a window (a forced prefix included), within the text context."""
        return min(self.max_steps - len(p.prefix), self.dims.n_text_ctx - len(p.tokens))

    def _budget(self, p: _Prepared) -> int:
        cap = p.request.max_new_tokens
        return self._whisper_budget(p) if cap is None else min(cap, self._whisper_budget(p))

    def _result(self, p: _Prepared, out: dict, row: int, max_new: int) -> DecodeResult:
        sampled = [int(t) for t in out["tokens"][row][:max_new]]
        ended = self.ids.eot in sampled
        n_sampled = sampled.index(self.ids.eot) + 1 if ended else len(sampled)
        tokens = p.prefix + sampled[: n_sampled - ended]
        duration = len(p.request.audio) / SAMPLE_RATE
        language = self._language_code(int(out["language"][row]))
        if p.request.timestamps:
            segments, seek = split_segments(tokens, self.tokenizer, duration)
        else:
            text_tokens = [t for t in tokens if t < self.ids.eot]
            segments = [Segment(0.0, duration, text_tokens, self.tokenizer.decode(text_tokens))] if text_tokens else []
            seek = duration
        text = self.tokenizer.decode(tokens)
        return DecodeResult(
            tokens=tokens,
            text=text,
            language=language,
            avg_logprob=float(out["sum_logprob"][row]) / (n_sampled - ended + 1),
            no_speech_prob=float(out["no_speech_prob"][row]),
            compression_ratio=compression_ratio(text),
            hit_token_limit=not ended and max_new == self._whisper_budget(p),
            truncated=not ended and max_new < self._whisper_budget(p),
            duration_s=duration,
            window_s=p.window_s,
            prompt_tokens=len(p.tokens),
            sampled_tokens=n_sampled,
            temperature=p.request.temperature,
            segments=segments,
            seek_s=seek,
        )

    def _language_code(self, token: int) -> str:
        if not self.dims.multilingual:
            return "en"
        by_id = {v: k for k, v in self.tokenizer.language_ids.items()}
        return by_id.get(token, "en")

    # -- facts for operators ---------------------------------------------------------------------
    @property
    def languages(self) -> list[str]:
        return list(self.tokenizer.language_ids) if self.dims.multilingual else ["en"]

    def memory(self) -> dict:
        """Device memory, in bytes per device, as XLA accounts for it: the parameters (the part
        each device holds), and for every compiled bucket the rest of what a call needs at its
        peak (its other inputs, outputs and temporaries: encoder activations, KV caches, logits)."""
        params = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree_util.tree_leaves(self.weights))
        buckets = {}
        for bucket, compiled in sorted(self._executables.items()):
            stats = compiled.memory_analysis()
            if stats is None:  # a backend without the analysis
                continue
            buckets[bucket] = (stats.argument_size_in_bytes - params + stats.output_size_in_bytes
                               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
        return {"params": params, "buckets": buckets}

    def describe(self) -> dict:
        return {
            "model": self.name,
            "dims": dataclasses.asdict(self.dims),
            "dtype": str(self.dtype),
            "devices": [str(d) for d in self.mesh.devices.flat],
            "mesh": dict(self.mesh.shape),
            "batch_buckets": list(self.batch_buckets),
            "window_buckets": list(self.window_buckets),
            "prompt_buckets": list(self.prompt_buckets),
            "encoder_rows": self.encoder_rows,
            "compiled_buckets": len(self._executables),
            "word_timestamps": self.word_timestamps,
            "word_token_buckets": list(self.word_token_buckets) if self.word_timestamps else [],
            "alignment_heads": self.alignment_heads_source,
        }


__all__ = ["Engine", "DecodeRequest", "DecodeResult", "AlignRequest", "Bucket", "AlignBucket", "compile_stats",
           "LANGUAGES"]
