"""Audio: decoding of real files in every container, the errors for unusable input, PCM16 and the
JAX log-mel spectrogram against transformers' ``WhisperFeatureExtractor``."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import soundfile as sf
import soxr

from conftest import DATA, CountingReader, encode_with_av, flac_silence, load_clip, load_refs, webm_silence

from jax_realtime.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    AudioError,
    AudioTooLong,
    Leveller,
    decode_audio,
    log_mel_spectrogram,
    pcm16_to_float32,
    window_samples,
)

# (soundfile format, subtype, extension, lossy)
FORMATS = [
    ("WAV", "PCM_16", "wav", False),
    ("FLAC", "PCM_16", "flac", False),
    ("OGG", "VORBIS", "ogg", True),
    ("MP3", "MPEG_LAYER_III", "mp3", True),
]


def _ref(clip_id: str) -> dict:
    return next(r for r in load_refs() if r["id"] == clip_id)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """A real 5.3 s speech clip (16 kHz mono PCM16 WAV)."""
    return load_clip(_ref("ljspeech-LJ001-0016"))


def _needs(fmt: str, subtype: str) -> None:
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}/{subtype}")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def _write(path, data, rate, fmt, subtype):
    sf.write(path, data, rate, format=fmt, subtype=subtype)
    return path


def _check_decoded(decoded: np.ndarray, expected: np.ndarray, lossy: bool) -> None:
    assert decoded.dtype == np.float32 and decoded.ndim == 1 and decoded.flags["C_CONTIGUOUS"]
    if lossy:
        # codecs may add or trim a few ms; the waveform must still be the same speech
        assert abs(len(decoded) - len(expected)) <= 0.02 * len(expected)
        assert _corr(decoded, expected) > 0.98
    else:
        assert len(decoded) == len(expected)
        # PCM16 / FLAC-16: one quantisation step at most
        np.testing.assert_allclose(decoded, expected, atol=1.5 / 32768, rtol=0)


# -- decoding ------------------------------------------------------------------------------------

def test_bundled_wav_is_read_exactly(clip):
    ref = _ref("ljspeech-LJ001-0016")
    raw, rate = sf.read(DATA / ref["wav"], dtype="int16")
    assert rate == SAMPLE_RATE
    np.testing.assert_array_equal(clip, raw.astype(np.float32) / 32768)
    assert len(clip) == pytest.approx(ref["duration_s"] * SAMPLE_RATE, abs=8)  # duration_s has 3 decimals


@pytest.mark.parametrize("fmt,subtype,ext,lossy", FORMATS, ids=[f[2] for f in FORMATS])
def test_decode_formats_at_16k(tmp_path, clip, fmt, subtype, ext, lossy):
    _needs(fmt, subtype)
    path = _write(tmp_path / f"clip.{ext}", clip, SAMPLE_RATE, fmt, subtype)
    _check_decoded(decode_audio(path), clip, lossy)
    _check_decoded(decode_audio(str(path)), clip, lossy)


@pytest.mark.parametrize("rate", [44100, 8000])
@pytest.mark.parametrize("fmt,subtype,ext,lossy", FORMATS, ids=[f[2] for f in FORMATS])
def test_decode_resamples_to_16k(tmp_path, clip, rate, fmt, subtype, ext, lossy):
    _needs(fmt, subtype)
    at_rate = soxr.resample(clip, SAMPLE_RATE, rate).astype(np.float32)
    if not lossy:
        at_rate = np.clip(at_rate, -1, 32767 / 32768)
    path = _write(tmp_path / f"clip{rate}.{ext}", at_rate, rate, fmt, subtype)
    decoded = decode_audio(path)

    expected_len = round(len(at_rate) * SAMPLE_RATE / rate)
    if lossy:
        assert abs(len(decoded) - expected_len) <= 0.02 * expected_len
    else:
        assert abs(len(decoded) - expected_len) <= 1
        # reference: what libsndfile reads at the file's rate, resampled to 16 kHz
        stored, stored_rate = sf.read(path, dtype="float32")
        assert stored_rate == rate
        reference = soxr.resample(stored, rate, SAMPLE_RATE)
        np.testing.assert_allclose(decoded, reference, atol=1e-5, rtol=0)
    # and it is the original speech again (8 kHz loses the 4-8 kHz band, hence the looser bound)
    assert _corr(decoded, clip) > (0.97 if rate == 8000 else 0.99)


@pytest.mark.parametrize("rate", [SAMPLE_RATE, 44100])
def test_stereo_is_mixed_down_by_averaging(tmp_path, clip, rate):
    left = clip
    t = np.arange(len(clip)) / SAMPLE_RATE
    right = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # clearly different channel
    stereo = np.stack([left, right], axis=1)
    if rate != SAMPLE_RATE:
        stereo = soxr.resample(stereo, SAMPLE_RATE, rate).astype(np.float32)
    path = _write(tmp_path / "stereo.wav", stereo, rate, "WAV", "FLOAT")
    assert sf.info(path).channels == 2

    decoded = decode_audio(path)
    mean = stereo.mean(axis=1)
    expected = mean if rate == SAMPLE_RATE else soxr.resample(mean, rate, SAMPLE_RATE)
    assert decoded.ndim == 1
    np.testing.assert_allclose(decoded, expected, atol=1e-5, rtol=0)
    # neither channel alone, nor their sum
    if rate == SAMPLE_RATE:
        for wrong in (left, right, left + right):
            assert np.abs(decoded - wrong).max() > 0.05


@pytest.mark.parametrize("fmt,subtype,ext,lossy", FORMATS, ids=[f[2] for f in FORMATS])
def test_decode_from_bytes_and_file_object(tmp_path, clip, fmt, subtype, ext, lossy):
    _needs(fmt, subtype)
    path = _write(tmp_path / f"clip.{ext}", clip, SAMPLE_RATE, fmt, subtype)
    from_path = decode_audio(path)
    data = path.read_bytes()

    np.testing.assert_array_equal(decode_audio(data), from_path)
    np.testing.assert_array_equal(decode_audio(bytearray(data)), from_path)
    np.testing.assert_array_equal(decode_audio(memoryview(data)), from_path)
    np.testing.assert_array_equal(decode_audio(io.BytesIO(data)), from_path)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(decode_audio(f), from_path)
    _check_decoded(from_path, clip, lossy)


def test_decode_from_bytes_at_44k_stereo(clip):
    stereo = np.stack([clip, -0.5 * clip], axis=1)
    buf = io.BytesIO()
    sf.write(buf, soxr.resample(stereo, SAMPLE_RATE, 44100).astype(np.float32), 44100, format="WAV", subtype="FLOAT")
    decoded = decode_audio(buf.getvalue())
    assert abs(len(decoded) - len(clip)) <= 1
    assert _corr(decoded, 0.25 * clip) > 0.99
    assert np.abs(decoded).max() == pytest.approx(0.25 * np.abs(clip).max(), rel=0.05)


@pytest.mark.parametrize("container,codec,rate,ext", [("mp4", "aac", 44100, "m4a"), ("webm", "libopus", 48000, "webm")])
def test_decode_ffmpeg_containers(tmp_path, clip, container, codec, rate, ext):
    """m4a/AAC and webm/Opus (what phones and browsers record) go through PyAV: mono 16 kHz, the
    channels averaged, from bytes, a path and a file object alike."""
    stereo = np.stack([clip, -0.5 * clip], axis=1)
    pytest.importorskip("av")
    data = encode_with_av(stereo, container, codec, rate)
    with pytest.raises(sf.LibsndfileError):
        sf.read(io.BytesIO(data))
    path = tmp_path / f"clip.{ext}"
    path.write_bytes(data)
    with open(path, "rb") as f:
        decoded = [decode_audio(data), decode_audio(path), decode_audio(f)]
    for d in decoded:
        np.testing.assert_array_equal(d, decoded[0])
    d = decoded[0]
    assert d.dtype == np.float32 and d.ndim == 1
    # AAC starts with 1024 samples of encoder priming (23 ms at 44.1 kHz): align before comparing
    lag = max(range(0, 2048), key=lambda k: _corr(d[k:k + len(clip) - 2048], clip[:len(clip) - 2048]))
    assert abs(len(d) - lag - len(clip)) <= 0.02 * len(clip)
    # (a fractional lag for AAC: 1024 * 16000 / 44100 = 371.5 samples, hence the looser bound)
    assert _corr(d[lag:lag + len(clip) - 2048], 0.25 * clip[:len(clip) - 2048]) > 0.95
    assert np.abs(d).max() == pytest.approx(0.25 * np.abs(clip).max(), rel=0.1)


# -- errors --------------------------------------------------------------------------------------

def _raises_naming(source, needle: str, **kw) -> AudioError:
    with pytest.raises(AudioError) as info:
        decode_audio(source, **kw)
    assert type(info.value) is AudioError
    assert needle in str(info.value), str(info.value)
    return info.value


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    err = _raises_naming(path, str(path))
    assert "no such file" in str(err)
    _raises_naming(str(path), str(path))


def test_directory(tmp_path):
    err = _raises_naming(tmp_path, str(tmp_path))
    assert "directory" in str(err)


def test_empty_bytes():
    err = _raises_naming(b"", "<audio>")
    assert "empty" in str(err)
    _raises_naming(b"", "upload.ogg", name="upload.ogg")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _raises_naming(path, str(path))


def test_random_garbage_bytes():
    rng = random.Random(1234)
    for _ in range(20):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4000)))
        _raises_naming(data, "<audio>")
        _raises_naming(data, "garbage.bin", name="garbage.bin")
        _raises_naming(io.BytesIO(data), "<audio>")


@pytest.mark.parametrize("magic", [b"RIFF", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"ID3\x03\x00"])
def test_garbage_behind_a_container_signature(magic):
    """A known signature followed by junk: AudioError, never a crash of another type."""
    rng = random.Random(magic)
    for _ in range(5):
        data = magic + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
        try:
            out = decode_audio(data)
        except AudioError as exc:
            assert "<audio>" in str(exc)
        else:  # libsndfile may find a few "samples" in junk; they must still be clean output
            assert out.dtype == np.float32 and out.ndim == 1 and np.all(np.isfinite(out))


def test_valid_wav_with_zero_samples(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE, subtype="PCM_16")
    assert sf.info(path).frames == 0
    err = _raises_naming(path, str(path))
    assert "no audio samples" in str(err)
    _raises_naming(path.read_bytes(), "<audio>")
    with open(path, "rb") as f:
        _raises_naming(f, "stream", name="stream")


def test_text_file_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("This is not audio, just some text.\n" * 20)
    err = _raises_naming(path, str(path))
    assert "cannot decode" in str(err)
    _raises_naming(path.read_bytes(), "notes.wav", name="notes.wav")


def test_truncated_header(tmp_path, clip):
    buf = io.BytesIO()
    sf.write(buf, clip, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    _raises_naming(buf.getvalue()[:30], "<audio>")


def test_non_finite_samples(tmp_path):
    path = tmp_path / "nan.wav"
    data = np.zeros(1000, np.float32)
    data[10] = np.nan
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    err = _raises_naming(path, str(path))
    assert "NaN" in str(err)


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


# -- the decoded-duration cap ---------------------------------------------------------------------

def _peak_bytes(fn) -> int:
    """Peak of Python-tracked allocations (numpy's buffers included) while ``fn`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_hours_of_flac_silence_are_refused_from_the_header():
    """2 h of digital silence: 180 kB of FLAC, 460 MB as 16 kHz float32.  Refused at once, without
    decoding (the header states the length), and the message says the limit."""
    import time

    data = flac_silence(2 * 3600)
    assert len(data) < 1024 * 1024
    started = time.perf_counter()
    peak = _peak_bytes(lambda: pytest.raises(AudioTooLong, decode_audio, data, "long.flac", max_seconds=3600))
    assert time.perf_counter() - started < 2.0
    assert peak < 16 * 1024 * 1024, peak
    with pytest.raises(AudioTooLong) as info:
        decode_audio(data, "long.flac", max_seconds=3600)
    assert str(info.value) == "long.flac: the audio (7200 s) is longer than the limit of 3600 s"
    assert info.value.limit_s == 3600 and isinstance(info.value, AudioError)


def test_webm_without_a_duration_stops_decoding_at_the_limit():
    """A MediaRecorder-style WebM (Opus, no duration in the header) of 5 minutes, capped at 60 s:
    decoding stops once 60 s are passed -- a fraction of the file is read, memory stays small."""
    data = webm_silence(300)
    import av

    with av.open(io.BytesIO(data)) as container:
        assert container.duration is None  # only decoding can tell its length
    reader = CountingReader(data, "rec.webm")
    peak = _peak_bytes(lambda: pytest.raises(AudioTooLong, decode_audio, reader, max_seconds=60))
    assert reader.bytes_read < 0.4 * len(data), (reader.bytes_read, len(data))
    assert peak < 16 * 1024 * 1024, peak  # 60 s at 16 kHz is 3.8 MB; 5 min at 48 kHz would be 58 MB
    with pytest.raises(AudioTooLong, match=r"^rec\.webm: the audio is longer than the limit of 60 s$"):
        decode_audio(CountingReader(data, "rec.webm"), max_seconds=60)
    assert len(decode_audio(data, max_seconds=301)) == 300 * SAMPLE_RATE  # under the cap: all of it


def test_webm_with_a_duration_is_refused_from_the_header():
    data = webm_silence(300, duration_header=True)
    reader = CountingReader(data)
    with pytest.raises(AudioTooLong, match=r"\(300 s\) is longer than the limit of 30 s"):
        decode_audio(reader, max_seconds=30)
    assert reader.bytes_read < 0.25 * len(data), (reader.bytes_read, len(data))


@pytest.mark.parametrize("fmt,subtype,ext,lossy", FORMATS, ids=[f[2] for f in FORMATS])
def test_the_cap_at_its_edge(tmp_path, clip, fmt, subtype, ext, lossy):
    """At 44.1 kHz stereo (mixed down and resampled block by block): a limit above the clip's
    length decodes exactly what no limit decodes; one below it is refused."""
    _needs(fmt, subtype)
    stereo = soxr.resample(np.stack([clip, 0.5 * clip], axis=1), SAMPLE_RATE, 44100).astype(np.float32)
    path = _write(tmp_path / f"clip.{ext}", stereo, 44100, fmt, subtype)
    duration = sf.info(path).frames / 44100
    full = decode_audio(path)
    np.testing.assert_array_equal(decode_audio(path, max_seconds=duration + 0.01), full)
    with pytest.raises(AudioTooLong):
        decode_audio(path, max_seconds=duration - 0.05)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_the_cap_must_be_positive(clip, bad):
    with pytest.raises(ValueError, match="max_seconds"):
        decode_audio(DATA / _ref("ljspeech-LJ001-0016")["wav"], max_seconds=bad)


# -- PCM16 ---------------------------------------------------------------------------------------

def test_pcm16_odd_byte_count():
    with pytest.raises(AudioError):
        pcm16_to_float32(b"\x00\x01\x02")
    with pytest.raises(AudioError):
        pcm16_to_float32(b"\x00")


def test_pcm16_scaling():
    values = np.array([0, 1, -1, 256, 16384, -16384, 32767, -32768], dtype="<i2")
    out = pcm16_to_float32(values.tobytes())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values.astype(np.float64) / 32768)
    assert out[-1] == -1.0 and out[-2] == 32767 / 32768
    # little-endian
    assert pcm16_to_float32(b"\x01\x00")[0] == 1 / 32768
    assert pcm16_to_float32(b"\x00\x01")[0] == 256 / 32768
    assert pcm16_to_float32(b"").shape == (0,)


def test_pcm16_every_value_round_trips():
    values = np.arange(-32768, 32768, dtype="<i2")
    out = pcm16_to_float32(values.tobytes())
    assert out.min() == -1.0 and out.max() < 1.0
    np.testing.assert_array_equal(np.round(out * 32768).astype(np.int32), values.astype(np.int32))


def test_pcm16_matches_wav_decoding(tmp_path, clip):
    path = tmp_path / "c.wav"
    sf.write(path, clip, SAMPLE_RATE, subtype="PCM_16")
    raw = sf.read(path, dtype="int16")[0].astype("<i2").tobytes()
    np.testing.assert_array_equal(pcm16_to_float32(raw), decode_audio(path))


# -- log-mel spectrogram -------------------------------------------------------------------------

def _extractor(n_mels: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels)


def _jax_mel(audio: np.ndarray, n_samples: int, n_mels: int) -> np.ndarray:
    import jax.numpy as jnp

    padded = np.zeros(n_samples, np.float32)
    padded[: min(len(audio), n_samples)] = audio[:n_samples]
    return np.asarray(log_mel_spectrogram(jnp.asarray(padded[None]), n_mels))[0]


MEL_CLIPS = ["hifitts-6097-bambatse_06_haggard_0090", "ljspeech-LJ001-0030", "ljspeech-LJ001-0001", "fleurs-fr-001"]


@pytest.mark.parametrize("clip_id", MEL_CLIPS)
def test_log_mel_80_matches_transformers(clip_id):
    audio = load_clip(_ref(clip_id))
    expected = _extractor(80)(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
    got = _jax_mel(audio, N_SAMPLES, 80)
    assert expected.shape == got.shape == (80, N_FRAMES)
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("clip_id", MEL_CLIPS[1::2])
def test_log_mel_128_matches_transformers(clip_id):
    audio = load_clip(_ref(clip_id))
    expected = _extractor(128)(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
    got = _jax_mel(audio, N_SAMPLES, 128)
    assert expected.shape == got.shape == (128, N_FRAMES)
    assert np.abs(got - expected).max() < 1e-3


@pytest.mark.parametrize("clip_id", ["ljspeech-LJ001-0030", "fleurs-de-001"])  # 6.9 s; 11.2 s (cut to 10 s)
def test_log_mel_short_window_matches_transformers(clip_id):
    audio = load_clip(_ref(clip_id))
    n = window_samples(10)
    expected = _extractor(80)(
        audio, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=n, truncation=True, return_tensors="np"
    )["input_features"][0]
    got = _jax_mel(audio, n, 80)
    assert expected.shape == got.shape == (80, 1000)
    assert np.abs(got - expected).max() < 1e-3
    # the extractor set up for 10 s chunks gives the same frames
    from transformers import WhisperFeatureExtractor

    chunked = WhisperFeatureExtractor(feature_size=80, chunk_length=10)(
        audio, sampling_rate=SAMPLE_RATE, return_tensors="np"
    )["input_features"][0]
    assert np.abs(got - chunked).max() < 1e-3


def test_log_mel_short_window_is_a_prefix_of_the_full_window():
    """Speech shorter than 10 s: the 10 s frames equal the first 1000 frames of the 30 s ones
    (the dynamic-range floor depends only on the loudest frame, which both contain)."""
    audio = load_clip(_ref("ljspeech-LJ001-0030"))
    short = _jax_mel(audio, window_samples(10), 80)
    full = _jax_mel(audio, N_SAMPLES, 80)
    assert np.abs(short[:, :999] - full[:, :999]).max() < 1e-4


def test_log_mel_batch_rows_are_independent():
    """The dynamic range is limited per row: batching a loud and a quiet clip changes neither."""
    import jax.numpy as jnp

    loud = load_clip(_ref("ljspeech-LJ001-0016"))
    quiet = 0.01 * load_clip(_ref("hifitts-6097-nada_lily_25_haggard_0351"))
    batch = np.zeros((2, N_SAMPLES), np.float32)
    batch[0, : len(loud)] = loud
    batch[1, : len(quiet)] = quiet
    got = np.asarray(log_mel_spectrogram(jnp.asarray(batch), 80))
    assert got.shape == (2, 80, N_FRAMES)
    for row, audio in enumerate((loud, quiet)):
        expected = _extractor(80)(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
        assert np.abs(got[row] - expected).max() < 1e-3


def test_log_mel_of_silence_is_finite():
    got = _jax_mel(np.zeros(0, np.float32), N_SAMPLES, 80)
    assert np.all(np.isfinite(got))
    expected = _extractor(80)(np.zeros(N_SAMPLES, np.float32), sampling_rate=SAMPLE_RATE,
                              return_tensors="np")["input_features"][0]
    assert np.abs(got - expected).max() < 1e-3
    # log10 clamped at 1e-10 -> -10, scaled: (-10 + 4) / 4
    np.testing.assert_allclose(got, -1.5, atol=1e-6)


# -- window sizes --------------------------------------------------------------------------------

def test_window_samples_known_values():
    assert window_samples(30) == N_SAMPLES == 480000
    assert window_samples(30.0) == 480000
    assert window_samples(10) == 160000
    assert window_samples(20) == 320000
    assert window_samples(15.5) == 248000
    assert window_samples(0.02) == 320


def test_window_samples_every_multiple_of_20ms():
    for k in range(1, 1501):
        assert window_samples(k * 0.02) == k * 320, k
        assert window_samples(round(k * 0.02, 2)) == k * 320, k


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.02, 0.01, 0.03, 10.001, 29.99, 1e-9, float("nan")])
def test_window_samples_invalid(bad):
    with pytest.raises(ValueError):
        window_samples(bad)


def test_window_samples_infinite():
    with pytest.raises(ValueError):
        window_samples(float("inf"))


def _levelled(audio: np.ndarray, chunk: int = 1600) -> np.ndarray:
    leveller = Leveller()
    out = [leveller.process(audio[i:i + chunk]) for i in range(0, len(audio), chunk)]
    return np.concatenate(out + [leveller.flush()])


def _db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-20)


def test_leveller_never_boosts_an_onset_after_a_pause():
    """A word after a pause starts at the level the rest of it gets: the gain the pause raised does
    not carry into the onset (a boosted, clipped onset is heard as an extra "h"), and nothing is
    clipped.  Before the fix the first 20 ms of the tone came out at full scale."""
    rng = np.random.default_rng(0)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    speech = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # -23 dBFS
    pause = (1e-4 * rng.standard_normal(SAMPLE_RATE)).astype(np.float32)  # -80 dBFS
    out = _levelled(np.concatenate([speech, pause, speech]))
    onset = out[2 * SAMPLE_RATE:2 * SAMPLE_RATE + 320]
    steady = out[2 * SAMPLE_RATE + 3200:3 * SAMPLE_RATE]
    assert np.abs(out).max() <= 10 ** (-1 / 20) + 1e-6  # -1 dBFS: never clipped
    assert np.abs(onset).max() <= 1.5 * np.abs(steady).max()


def test_leveller_brings_a_quiet_speaker_up_to_a_loud_one():
    """What it is for: a clip 40 dB quieter right after a loud one comes out within a few dB of it
    (after the first fraction of a second), so Whisper does not skip it in a shared window."""
    refs = {r["id"]: r for r in load_refs()}
    loud, quiet = load_clip(refs["fleurs-en-005"]), load_clip(refs["fleurs-en-004"])
    assert _db(loud) - _db(quiet) > 40  # as recorded
    out = _levelled(np.concatenate([loud, quiet]))
    loud_out, quiet_out = out[:len(loud)], out[len(loud) + SAMPLE_RATE // 2:len(loud) + len(quiet)]
    assert abs(_db(loud_out) - _db(quiet_out)) < 10
