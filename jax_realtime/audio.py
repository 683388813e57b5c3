"""Audio constants, decoding and the log-mel spectrogram.

Every size is derived from the few numbers Whisper was trained with, so a change in one place
cannot leave another inconsistent.  The log-mel spectrogram is written in ``jax.numpy`` so that it
runs inside the engine's compiled function; it matches transformers' ``WhisperFeatureExtractor``.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import os
from typing import BinaryIO, Union

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
CHUNK_LENGTH = 30  # seconds of audio in a full Whisper window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in a 30 s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # 320: the encoder's second conv has stride 2
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 50 audio positions per second
TIME_PRECISION = 1 / TOKENS_PER_SECOND  # 0.02 s: the step of Whisper's timestamp tokens

AudioSource = Union[str, os.PathLike, bytes, BinaryIO]


class AudioError(ValueError):
    """Audio that cannot be used: undecodable, empty, or of the wrong form."""


def window_samples(window_s: float) -> int:
    """Samples in an encoder window of ``window_s`` seconds (must be a whole number of positions)."""
    if not math.isfinite(window_s):
        raise ValueError(f"window of {window_s} s is not a positive multiple of {TIME_PRECISION} s")
    positions = round(window_s * TOKENS_PER_SECOND)
    if positions <= 0 or abs(positions - window_s * TOKENS_PER_SECOND) > 1e-6:
        raise ValueError(f"window of {window_s} s is not a positive multiple of {TIME_PRECISION} s")
    return positions * N_SAMPLES_PER_TOKEN


def decode_audio(source: AudioSource, name: str | None = None, max_seconds: float | None = None) -> np.ndarray:
    """Decode wav/flac/ogg/mp3 (anything libsndfile reads; m4a/mp4, webm and the rest of FFmpeg's
    formats through PyAV) to mono float32 at 16 kHz.

    ``source`` is a path, the file's bytes, or a binary file object.  Stereo is mixed down by
    averaging the channels; other sample rates are resampled with soxr.  Raises
    :class:`AudioError` naming the input for anything that is not usable audio.

    ``max_seconds`` (None: no limit) caps the decoded duration: a file longer than that raises
    :class:`AudioTooLong` as soon as that is known -- from the header where it states the length
    (libsndfile's frame count, FFmpeg's container duration), else while decoding, which stops
    there.  Files are decoded block by block (each block mixed down and resampled as it comes), so
    memory stays about the size of the 16 kHz result, whatever the file's rate and channels.
    """
    import soundfile as sf

    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, not {max_seconds}")
    if name is None:
        if isinstance(source, (str, os.PathLike)):
            name = os.fspath(source)
        else:
            file_name = getattr(source, "name", None)
            name = file_name if isinstance(file_name, str) else "<audio>"
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise AudioError(f"{name}: no such file")
        if os.path.isdir(source):
            raise AudioError(f"{name}: is a directory, not an audio file")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError(f"{name}: the file is empty")
        source = io.BytesIO(bytes(source))
    start = source.tell() if hasattr(source, "seek") and hasattr(source, "tell") else None
    try:
        mono = _read_with_sndfile(source, name, max_seconds)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # not a container libsndfile knows (m4a/mp4/AAC, webm, ...): try FFmpeg's decoders
        if start is not None:
            source.seek(start)
        mono = _read_with_av(source, name, max_seconds)
        if mono is None:
            raise AudioError(f"{name}: cannot decode audio ({exc})") from exc
    except OSError as exc:
        raise AudioError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    if mono.size == 0:
        raise AudioError(f"{name}: contains no audio samples")
    return mono


class AudioTooLong(AudioError):
    """Audio longer than the caller's ``max_seconds`` (decoding stopped there)."""

    def __init__(self, name: str, limit_s: float, duration_s: float | None = None):
        self.limit_s = limit_s
        self.duration_s = duration_s  # what the header stated, when it did
        stated = f" ({duration_s:.0f} s)" if duration_s is not None else ""
        super().__init__(f"{name}: the audio{stated} is longer than the limit of {limit_s:g} s")


_BLOCK_FRAMES = 1 << 18  # frames read at a time (~6 s at 44.1 kHz)


def _clearly_over(stated_s: float, max_seconds: float) -> bool:
    """Whether a header's length is over the cap by more than an estimate's error (5 % + 1 s):
    refused then without decoding.  Headers of MP3 (libsndfile) or of ADTS AAC (FFmpeg) may hold
    an estimate, and a file just under the cap must not be refused for it; anything between is
    decoded and counted, which holds the cap exactly."""
    return stated_s > max_seconds * 1.05 + 1.0


class _MonoAt16k:
    """Blocks of ``[frames, channels]`` float32 at ``rate`` -> one mono 16 kHz float32 array.

    Each block is mixed down (the channels' mean) and resampled with soxr's streaming resampler
    (identical output to resampling the whole file at once), checked for NaN/infinity, and counted
    against ``max_seconds``: past it, :class:`AudioTooLong`."""

    def __init__(self, name: str, rate: int, max_seconds: float | None, expected_frames: int | None = None):
        import soxr

        if rate <= 0:
            raise AudioError(f"{name}: invalid sample rate {rate}")
        self.name, self.rate, self.max_seconds = name, rate, max_seconds
        self.limit = None if max_seconds is None else math.floor(max_seconds * rate)
        self.frames = 0
        self._stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
        # room for what the header announces (never more than the limit, or an hour without one);
        # grown as needed when the header understated or did not say
        size = math.ceil(expected_frames * SAMPLE_RATE / rate) + 64 if expected_frames else 0
        cap = 3600 * SAMPLE_RATE if max_seconds is None else math.ceil(max_seconds * SAMPLE_RATE) + 64
        self._out = np.empty(min(size, cap), np.float32)
        self._n = 0

    def add(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        self.frames += len(block)
        if self.limit is not None and self.frames > self.limit:
            raise AudioTooLong(self.name, self.max_seconds)
        mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
        if not np.all(np.isfinite(mono)):
            raise AudioError(f"{self.name}: audio contains NaN or infinite samples")
        self._append(mono if self._stream is None else self._stream.resample_chunk(mono))

    def _append(self, samples: np.ndarray) -> None:
        end = self._n + len(samples)
        if end > len(self._out):
            grown = np.empty(max(end, 2 * len(self._out)), np.float32)
            grown[: self._n] = self._out[: self._n]
            self._out = grown
        self._out[self._n:end] = samples
        self._n = end

    def result(self) -> np.ndarray:
        if self._stream is not None:
            self._append(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
        out = self._out[: self._n]
        # a header that overstated the length leaves unused room: give it back
        return out if len(self._out) - self._n <= 1024 else out.copy()


def _read_with_sndfile(source, name: str, max_seconds: float | None) -> np.ndarray:
    """libsndfile's formats; raises libsndfile's errors for anything it cannot read."""
    import soundfile as sf

    with sf.SoundFile(source) as f:
        frames = f.frames if 0 <= f.frames < 2**62 else None  # a stream of unknown length reports a huge count
        if max_seconds is not None and frames is not None and _clearly_over(frames / f.samplerate, max_seconds):
            raise AudioTooLong(name, max_seconds, frames / f.samplerate)
        out = _MonoAt16k(name, f.samplerate, max_seconds, frames)
        while True:
            block = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            if not len(block):
                break
            out.add(block)
        return out.result()


def _read_with_av(source, name: str, max_seconds: float | None) -> np.ndarray | None:
    """The first audio stream of ``source`` decoded with PyAV (FFmpeg), mono at 16 kHz; None when
    PyAV is missing or cannot read it."""
    try:
        import av
    except ImportError:
        return None
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    out: _MonoAt16k | None = None
    try:
        with av.open(source, mode="r", metadata_errors="ignore") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                return None
            # a stated duration clearly over the limit is refused at once; one that is absent (a
            # browser's MediaRecorder webm), understated or near it is caught by counting samples
            if max_seconds is not None and container.duration is not None:
                stated = container.duration / av.time_base
                if _clearly_over(stated, max_seconds):
                    raise AudioTooLong(name, max_seconds, stated)
            # packed float32 at the stream's own layout and rate (fixed by the first frame): the
            # channels are averaged and the rate converted as for libsndfile's formats
            resampler = av.AudioResampler(format="flt")
            for frame in container.decode(stream):
                for chunk in resampler.resample(frame):
                    if out is None:
                        out = _MonoAt16k(name, chunk.sample_rate, max_seconds)
                    out.add(chunk.to_ndarray().reshape(-1, chunk.layout.nb_channels))
            for chunk in resampler.resample(None):
                if out is None:
                    out = _MonoAt16k(name, chunk.sample_rate, max_seconds)
                out.add(chunk.to_ndarray().reshape(-1, chunk.layout.nb_channels))
    except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
        if isinstance(exc, AudioError):
            raise
        return None
    if out is None:  # a stream without a single frame
        return np.zeros(0, np.float32)
    return out.result()


def pcm16_to_float32(data: bytes) -> np.ndarray:
    """Little-endian PCM16 bytes to float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise AudioError("PCM16 audio must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-style mel filter bank, shape ``(N_FFT // 2 + 1, n_mels)``, as Whisper uses it."""
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    ).astype(np.float32)


def log_mel_spectrogram(audio, n_mels: int):
    """Whisper's log-mel spectrogram of ``audio`` (``[batch, samples]``) in ``jax.numpy``.

    Returns ``[batch, n_mels, samples // HOP_LENGTH]``.  Same steps as openai-whisper and
    transformers: centred STFT (reflect padding) with a periodic Hann window, power spectrum,
    mel projection, ``log10`` clamped at 1e-10, dynamic range limited to 8 (per row), then scaled
    to roughly [-1, 1].  The last STFT frame is dropped, so a 30 s window gives 3000 frames.
    """
    import jax.numpy as jnp

    n_frames = audio.shape[-1] // HOP_LENGTH
    padded = jnp.pad(audio, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
    index = (np.arange(n_frames)[:, None] * HOP_LENGTH + np.arange(N_FFT)[None, :]).astype(np.int32)
    window = np.hanning(N_FFT + 1)[:-1].astype(np.float32)  # periodic Hann
    frames = padded[:, index] * window  # [batch, frames, N_FFT]
    power = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2  # [batch, frames, N_FFT // 2 + 1]
    mel = jnp.einsum("bfk,km->bmf", power, mel_filters(n_mels), precision="highest")
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return (log_spec + 4.0) / 4.0


class Leveller:
    """Slow automatic gain for a live stream, so that every stretch of speech reaches Whisper at a
    similar level.

    Why: Whisper normalises each window by its loudest moment (the log-mel spectrogram's dynamic
    range is measured from the window's maximum), and a passage 40 dB quieter than its neighbour in
    the same window is, to the model, background: it is skipped.  Offline, a quiet recording fills
    its windows alone and is heard; a stream that goes from a quiet speaker to a loud one (or a
    microphone whose level changes) puts both into one window.  Levelling the stream as it arrives
    restores what each passage would have sounded like alone.  A steady stream gets a steady gain,
    and a constant gain changes nothing Whisper sees (the spectrogram is normalised anyway).

    How: the level of every 20 ms frame (RMS, dB) feeds an envelope that follows a louder frame at
    once, holds for ``hold_s`` (the pauses between words), then falls back at ``release_db_s`` dB a
    second, never below ``margin_db`` above the quietest frame of the last ``noise_s`` seconds (the
    noise floor, which therefore is never raised to speech level in pauses).  A fast release matters:
    the first words of a quiet speaker right after a loud one must not stay quiet.  The gain brings
    the envelope to ``target_db``, between ``min_gain_db`` and ``max_gain_db``: loud speech is turned
    down as quiet speech is turned up, so that the two meet (Whisper still skips a passage 15 dB
    below its neighbour in the same window).  A louder frame gets its lower gain from its first
    sample (an onset is never boosted by the gain of the pause before it), a rising gain ramps across
    the frame, and no frame is given more gain than takes its peak to -1 dBFS (no clipping).
    Causal: a sample's gain depends on its own 20 ms frame and what came before it only, and a frame
    is output once, whole, so audio already decoded never changes.
    """

    FRAME = 320  # 20 ms at 16 kHz

    def __init__(self, target_db: float = -20.0, hold_s: float = 0.3, release_db_s: float = 100.0,
                 min_gain_db: float = -20.0, max_gain_db: float = 50.0, margin_db: float = 15.0, noise_s: float = 2.0):
        self.target_db, self.min_gain_db, self.max_gain_db, self.margin_db = target_db, min_gain_db, max_gain_db, margin_db
        self._release = release_db_s * self.FRAME / SAMPLE_RATE  # dB per frame
        self._hold = round(hold_s * SAMPLE_RATE / self.FRAME)  # frames
        self._held = 0  # frames since the envelope last rose
        self._levels: collections.deque = collections.deque(maxlen=max(1, round(noise_s * SAMPLE_RATE / self.FRAME)))
        self._envelope: float | None = None
        self._gain_db = 0.0
        self._carry = np.zeros(0, np.float32)

    @property
    def gain_db(self) -> float:
        return self._gain_db

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Level ``samples`` (float32); returns as many samples as whole frames allow (the rest is
        held for the next call, at most 19 ms)."""
        x = np.concatenate([self._carry, np.asarray(samples, np.float32)])
        n = len(x) // self.FRAME * self.FRAME
        self._carry = x[n:]
        frames = x[:n].reshape(-1, self.FRAME)
        levels = 10.0 * np.log10(np.mean(np.square(frames, dtype=np.float64), axis=1) + 1e-12)
        gains = np.empty(len(frames) + 1)
        gains[0] = self._gain_db
        for k, level in enumerate(levels):
            self._levels.append(level)
            floor = min(self._levels) + self.margin_db
            env = self._envelope
            if env is None or level >= env:
                env, self._held = level, 0
            else:
                self._held += 1
                if self._held > self._hold:
                    env = max(level, env - self._release)
            env = max(env, floor)
            self._envelope = env
            gains[k + 1] = min(self.max_gain_db, max(self.min_gain_db, self.target_db - env))
        # Never more gain than takes a frame's peak to full scale (less 1 dB): no clipping.
        peaks = np.abs(frames).max(axis=1)
        safe = -20.0 * np.log10(np.maximum(peaks, 1e-9)) - 1.0
        gains[1:] = np.minimum(gains[1:], safe)
        self._gain_db = float(gains[-1])
        # Attack at once: a frame louder than what came before gets its own (lower) gain from its first
        # sample, not a ramp down from the previous frame's gain (which would boost an onset); a
        # release ramps up across the frame.
        start = np.minimum(gains[:-1], gains[1:])
        ramp = start[:, None] + (gains[1:] - start)[:, None] * (np.arange(self.FRAME) / self.FRAME)
        out = frames * np.power(10.0, ramp / 20.0)
        return np.clip(out.reshape(-1), -1.0, 1.0).astype(np.float32)

    def flush(self) -> np.ndarray:
        """The held samples (end of the stream), at the current gain."""
        out = np.clip(self._carry * 10.0 ** (self._gain_db / 20.0), -1.0, 1.0).astype(np.float32)
        self._carry = np.zeros(0, np.float32)
        return out


# -- G.711 and input formats of live audio (OpenAI's realtime formats) ---------------------------------

def _ulaw_table() -> np.ndarray:
    """The 256 µ-law codes (ITU-T G.711) as 16-bit linear values."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """The 256 A-law codes (ITU-T G.711) as 16-bit linear values."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


ULAW_TABLE = _ulaw_table()
ALAW_TABLE = _alaw_table()


def ulaw_to_float32(data: bytes) -> np.ndarray:
    """G.711 µ-law bytes (8 kHz) to float32 samples in [-1, 1) at the same rate."""
    return ULAW_TABLE[np.frombuffer(data, np.uint8)].astype(np.float32) / 32768.0


def alaw_to_float32(data: bytes) -> np.ndarray:
    """G.711 A-law bytes (8 kHz) to float32 samples in [-1, 1) at the same rate."""
    return ALAW_TABLE[np.frombuffer(data, np.uint8)].astype(np.float32) / 32768.0


class InputFormat:
    """A live stream in one of the realtime wire formats, decoded to 16 kHz float32 as it arrives.

    ``pcm16`` (16 kHz s16le, vLLM's), ``pcm24`` (24 kHz s16le, OpenAI's ``audio/pcm``), ``pcmu`` and
    ``pcma`` (G.711 µ-law and A-law at 8 kHz).  Other rates go through one soxr stream per session,
    so chunk edges leave no trace; :meth:`flush` ends a stretch (a committed turn) and returns the
    samples the resampler still holds."""

    RATES = {"pcm16": SAMPLE_RATE, "pcm24": 24000, "pcmu": 8000, "pcma": 8000}

    def __init__(self, kind: str = "pcm16"):
        if kind not in self.RATES:
            raise ValueError(f"unknown input format {kind!r}")
        self.kind = kind
        self.rate = self.RATES[kind]
        self.bytes_per_sample = 2 if kind in ("pcm16", "pcm24") else 1
        self._stream = None

    def decode(self, data: bytes) -> np.ndarray:
        if self.kind == "pcmu":
            samples = ulaw_to_float32(data)
        elif self.kind == "pcma":
            samples = alaw_to_float32(data)
        else:
            samples = pcm16_to_float32(data)
        if self.rate == SAMPLE_RATE:
            return samples
        if self._stream is None:
            import soxr

            self._stream = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return self._stream.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, np.float32)
        out = self._stream.resample_chunk(np.zeros(0, np.float32), last=True)
        self._stream = None
        return out
