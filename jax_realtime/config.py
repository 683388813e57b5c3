"""Configuration: the model's dimensions and the engine's settings.

``ModelDims`` is read from a checkpoint, never written by hand.  ``EngineConfig`` is what an
operator chooses (model, dtype, shape buckets, cache directory); it is a frozen, validated
pydantic model so that a bad value fails at load time with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .audio import CHUNK_LENGTH, TOKENS_PER_SECOND
from .thresholds import COMPRESSION_RATIO_THRESHOLD, LOGPROB_THRESHOLD, NO_SPEECH_THRESHOLD


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Whisper's hyper-parameters (openai-whisper's ``ModelDimensions``)."""

    n_mels: int
    n_vocab: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @property
    def multilingual(self) -> bool:
        # 51864 tokens for English-only models, 51865 (and more for large-v3) otherwise.
        return self.n_vocab >= 51865

    @property
    def max_new_tokens(self) -> int:
        """Whisper samples at most half the text context per 30 s window (224)."""
        return self.n_text_ctx // 2


def default_cache_dir() -> str:
    """Where converted weights and compiled programs are kept (``$JAX_REALTIME_CACHE``)."""
    env = os.environ.get("JAX_REALTIME_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jax-realtime")


DEFAULT_MODEL = "tiny.en"
MIN_WORD_TOKENS = 229  # word alignment of a full window: <|startoftranscript|> lang task <|notimestamps|> 224 text <|endoftext|>

# Whisper's longest decoder prompt: half the text context (448 // 2 = 224) less one is the most
# previous text it conditions on (223 tokens), plus <|startofprev|>, plus the start sequence
# (<|startoftranscript|>, language, task, <|notimestamps|>).  A forced prefix (at most 223 tokens,
# one less than a window's 224) after the start sequence is no longer.  The engine prefills a
# prompt in the smallest bucket that holds it, so the largest bucket must hold this one.
MIN_LARGEST_PROMPT_BUCKET = 223 + 1 + 4


class EngineConfig(BaseModel):
    """What the engine compiles and how.

    * ``batch_buckets``: batch sizes the engine compiles; a call is padded up to the smallest that
      fits (rounded up to a multiple of the data-parallel device count).
    * ``window_buckets``: encoder windows in seconds.  Whisper's window is 30 s; shorter windows
      encode only the first ``W * 100`` mel frames and ``W * 50`` positions, which is much cheaper
      and, from 15 s up, as accurate (see ``docs/measurements`` and ``scripts/eval_windows.py``).
      30 s must be present for long-form audio and for the fallback from a short window.
    * ``prompt_buckets``: lengths of the token prefix (previous text + start-of-transcript
      sequence) the decoder prefills in one pass.  The largest must hold Whisper's longest
      prompt, ``MIN_LARGEST_PROMPT_BUCKET``: 223 previous tokens + ``<|startofprev|>`` + 4 = 228
      (a forced prefix of up to 223 tokens after the start sequence fits it too).
    * ``word_timestamps``: compile word alignment too (``alignment.py``): requests may then ask for
      word-level timestamps.  Off: nothing more is compiled and requests asking for words fail.
    * ``word_token_buckets``: lengths of the token sequence word alignment runs on (start sequence,
      ``<|notimestamps|>``, the window's text, end of text); the largest must hold a full window's
      text: 224 + 5 = 229.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(DEFAULT_MODEL, min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_buckets: tuple[int, ...] = (1, 4, 8)
    window_buckets: tuple[float, ...] = (10.0, 20.0, 30.0)
    prompt_buckets: tuple[int, ...] = (8, 64, 232)
    window_fallback: bool = True  # re-decode degenerate short-window output in a longer window
    # Rows the encoder processes at once.  None: 1 on a single CPU device (there a batched
    # encoder is slower than one row after another: its attention no longer fits in cache),
    # the whole batch elsewhere.
    encoder_rows: int | None = Field(None, ge=1)
    # Devices that hold one copy of the model between them (tensor parallelism, see
    # sharding.param_partition); 1: every device holds all parameters.  Must divide the device count.
    model_parallelism: int = Field(1, ge=1)
    cache_dir: str = Field(default_factory=default_cache_dir)
    compilation_cache: bool = True
    word_timestamps: bool = False
    word_token_buckets: tuple[int, ...] = (64, 232)

    @field_validator("batch_buckets", "prompt_buckets", "word_token_buckets")
    @classmethod
    def _positive_sorted(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("needs at least one bucket")
        if any(v <= 0 for v in value):
            raise ValueError("buckets must be positive")
        return tuple(sorted(set(value)))

    @field_validator("window_buckets")
    @classmethod
    def _windows(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("needs at least one window")
        for w in value:
            positions = w * TOKENS_PER_SECOND
            if not 0 < w <= CHUNK_LENGTH or abs(positions - round(positions)) > 1e-6:
                raise ValueError(f"window {w} s must be in (0, {CHUNK_LENGTH}] and a multiple of 0.02 s")
        return tuple(sorted(set(float(w) for w in value)))

    @model_validator(mode="after")
    def _full_window_present(self) -> "EngineConfig":
        if max(self.window_buckets) != CHUNK_LENGTH:
            raise ValueError(f"window_buckets must include {CHUNK_LENGTH} s (Whisper's full window)")
        if max(self.prompt_buckets) < MIN_LARGEST_PROMPT_BUCKET:
            raise ValueError(
                f"prompt_buckets: the largest bucket ({max(self.prompt_buckets)}) must hold Whisper's longest prompt, "
                f"{MIN_LARGEST_PROMPT_BUCKET} tokens (223 of previous text + <|startofprev|> + the 4-token start "
                f"sequence); add a bucket of at least {MIN_LARGEST_PROMPT_BUCKET}, e.g. 232")
        if max(self.word_token_buckets) < MIN_WORD_TOKENS:
            raise ValueError(f"the largest word_token_bucket must hold a full window's text ({MIN_WORD_TOKENS})")
        return self


class StreamConfig(BaseModel):
    """How a live utterance is decoded (see ``streaming.py``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_s: float = Field(1.0, gt=0, le=CHUNK_LENGTH, description="decode again after this much new audio")
    trim_after_s: float = Field(15.0, gt=0, lt=CHUNK_LENGTH, description="trim the window once it is longer")
    max_window_s: float = Field(float(CHUNK_LENGTH), gt=0, le=CHUNK_LENGTH)
    agreement: int = Field(2, ge=1, le=5, description="hypotheses that must agree before text is sent")
    holdback_tokens: int = Field(0, ge=0, le=20, description="newest tokens never sent before a later step")
    # A step decodes on from the committed text; capping what it may add keeps one session's step
    # from holding a shared batch for long (a step adds a few words; the rest waits for the next).
    max_step_tokens: int = Field(32, ge=4, le=224)
    no_speech_threshold: float = Field(NO_SPEECH_THRESHOLD, ge=0, le=1)
    logprob_threshold: float = LOGPROB_THRESHOLD
    compression_ratio_threshold: float = Field(COMPRESSION_RATIO_THRESHOLD, gt=0)
    silence_keep_s: float = Field(1.0, ge=0)
    # Committed text before the window given as the decoder's prompt (the session's own prompt is
    # always given).  0 by default: a continuation already carries the window's committed text as
    # its forced prefix, and a previous-text prompt in a window shorter than 30 s keeps Whisper from
    # placing the timestamps the window is cut at (measured: scripts/eval_realtime.py, 4x).
    max_prompt_tokens: int = Field(0, ge=0, le=223)
    keep_audio_after_final: bool = False  # vLLM drops audio appended after final:true
    # A fresh decode's complete segments past the committed text are committed too (Whisper's seek
    # rule); off: a fresh decode only finds where to cut inside text the continuations committed.
    fresh_commits: bool = False
    # Level the stream as it arrives (audio.Leveller): a quiet passage next to a loud one in the
    # same window is otherwise skipped by Whisper.
    level_audio: bool = True
    # Voice activity (vad.py, Silero): audio in which it hears no speech is not decoded (once the
    # text before it is settled) and leaves the window as silence.
    vad: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> "StreamConfig":
        if not self.step_s <= self.trim_after_s < self.max_window_s:
            raise ValueError("need step_s <= trim_after_s < max_window_s")
        return self


API_KEY_ENV = "JAX_REALTIME_API_KEY"


def _check_api_key(key: str, where: str) -> str:
    """A key a client can send as ``Authorization: Bearer <key>``: visible ASCII, no spaces."""
    if not key:
        raise ValueError(f"{where}: an API key must not be empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in key):
        raise ValueError(f"{where}: an API key may only hold visible ASCII characters (no spaces)")
    return key


def read_api_key_file(path: str | os.PathLike) -> tuple[str, ...]:
    """The keys of a key file: one per line; blank lines and lines starting with ``#`` are skipped.

    Raises ``ValueError`` naming the file when it cannot be read or holds no key."""
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ValueError(f"api_key_file {where}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ValueError(f"api_key_file {where}: not UTF-8 text") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError(f"api_key_file {where}: holds no key")
    return tuple(_check_api_key(k, f"api_key_file {where}, key {i + 1}") for i, k in enumerate(keys))


class ServerConfig(BaseModel):
    """The service's limits, names and API keys (``[server]`` table)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_names: tuple[str, ...] = ()  # names clients may ask for; default: the checkpoint's name + aliases
    max_sessions: int = Field(64, ge=1)
    max_buffer_s: float = Field(120.0, gt=0, description="audio a session may have queued, not yet decoded")
    idle_timeout_s: float = Field(300.0, gt=0)
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # API keys: with any configured (here, in api_key_file or in $JAX_REALTIME_API_KEY), every /v1/
    # route (REST and the WebSocket handshake) needs ``Authorization: Bearer <one of them>``.
    # ``api_key_file`` is one path or a list of them.
    api_keys: tuple[str, ...] = ()
    api_key_file: str | tuple[str, ...] | None = None
    # REST: the largest request body accepted (the uploaded file plus the form), in MiB, and the time
    # a request may take, from its arrival to the last byte of the answer (upload included).
    max_upload_mb: float = Field(25.0, gt=0, le=4096)
    request_timeout_s: float = Field(600.0, gt=0)
    # REST: the longest audio an upload may decode to.  The body cap bounds compressed bytes only:
    # 25 MB of FLAC silence or 6 kb/s Opus is many hours.  Decoded audio is 16 kHz float32,
    # 64 kB a second: 3 h is 691 MB per request (the decode stops as soon as the cap is passed).
    max_audio_s: float = Field(3 * 3600.0, gt=0)
    # REST: transcription/translation requests in progress at once (upload parsed -> answer sent,
    # the audio decoding included); one more is answered 503 with Retry-After.  Each holds its body
    # (<= max_upload_mb) and its decoded audio (<= max_audio_s at 64 kB/s) until it ends.
    max_concurrent_requests: int = Field(4, ge=1)
    # REST ``stream=true``: the events' shape when the request does not choose (form field
    # ``stream_format``): "openai" (``transcript.text.delta``/``.done``, what OpenAI's SDKs parse) or
    # "vllm" (``transcription.chunk`` events and ``[DONE]``, what vLLM's clients parse).
    rest_stream_format: Literal["openai", "vllm"] = "openai"
    # The batcher's queue: windows waiting for the engine; one more is refused (REST: 503,
    # realtime: an error event).  None: 2 x (max_sessions + max_concurrent_requests), twice what
    # can be waiting in normal operation (a streaming session and a REST request each have at most
    # one window queued).  A waiting window holds at most 30 s of 16 kHz float32 audio (1.9 MB),
    # so the default (136) bounds the queue at about 260 MB.
    max_pending: int | None = Field(None, ge=1)
    # On SIGTERM/SIGINT: how long running utterances and requests get to finish before the sockets
    # close (keep it below Hypercorn's graceful_timeout when running under the hypercorn command).
    drain_timeout_s: float = Field(25.0, ge=0)
    # The batcher lets a request wait this long for others to join its batch (sessions step on a
    # shared clock, so their requests arrive within milliseconds of each other).
    batch_gather_s: float = Field(0.02, ge=0, le=1.0)
    # Admission: a realtime session is refused (server_busy) unless the engine's measured load
    # (capacity.LoadMeter) leaves room for every connected session plus the new one to stream while
    # the engine stays busy at most this share of the time.
    target_load: float = Field(0.8, gt=0, le=1.0)
    admission_control: bool = True  # false: only max_sessions limits sessions (tests, fixed-size fleets)

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_api_key(k, f"key {i + 1}") for i, k in enumerate(value))

    @field_validator("api_key_file")
    @classmethod
    def _key_file(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        for path in (value,) if isinstance(value, str) else value or ():
            read_api_key_file(path)  # fail at load time, naming the file
        return value

    @property
    def api_key_files(self) -> tuple[str, ...]:
        """``api_key_file`` as a tuple of paths (empty when there is none)."""
        value = self.api_key_file
        return (value,) if isinstance(value, str) else tuple(value or ())

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def effective_max_pending(self) -> int:
        """``max_pending``, or its default: 2 x (max_sessions + max_concurrent_requests)."""
        if self.max_pending is not None:
            return self.max_pending
        return 2 * (self.max_sessions + self.max_concurrent_requests)

    def effective_api_keys(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """Every accepted key: ``api_keys``, the key files', and ``$JAX_REALTIME_API_KEY``'s (one key,
        or several separated by commas).  Empty: no authentication."""
        environ = os.environ if environ is None else environ
        keys = list(self.api_keys)
        for path in self.api_key_files:
            keys += read_api_key_file(path)
        env = environ.get(API_KEY_ENV, "")
        if env.strip():
            keys += [_check_api_key(k.strip(), f"${API_KEY_ENV}") for k in env.split(",") if k.strip()]
        return tuple(dict.fromkeys(keys))


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file, key and problem."""


class ServiceConfig(BaseModel):
    """Everything a deployment configures, one TOML table per section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)


def load_config(path: str | os.PathLike | None = None, *, server: dict | None = None, stream: dict | None = None,
                **engine_overrides) -> ServiceConfig:
    """Read and validate a TOML config (defaults when ``path`` is None).

    Overrides (command-line flags) replace values of the ``[engine]`` table (keyword arguments)
    and of the ``[server]`` and ``[stream]`` tables (dicts); ``None`` values are ignored.  Errors
    name the file and the exact key.
    """
    import tomllib

    from pydantic import ValidationError

    data: dict = {}
    where = os.fspath(path) if path is not None else "<defaults>"
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read ({exc.strerror or exc})") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: not valid TOML ({exc})") from exc
    for section, overrides in (("engine", engine_overrides), ("server", server or {}), ("stream", stream or {})):
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            data = {**data, section: {**data.get(section, {}), **overrides}}
    try:
        return ServiceConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            secret = any("key" in str(part) for part in err["loc"])  # never echo a key (or a typo of one) into a log
            shown = "input" in err and err["type"] != "missing" and not secret
            problems.append(f"{key}: {err['msg']}" + (f" (got {err['input']!r})" if shown else ""))
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None
