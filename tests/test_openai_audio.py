"""Fast checks (no server) of what OpenAI's realtime protocol adds underneath: the input formats
(G.711 tables, 24 kHz and 8 kHz streams resampled to 16 kHz) and server-VAD turn detection on the
Silero model, plus the OpenAI dialect's choice at the handshake."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_clip, load_refs
from jax_realtime.audio import ALAW_TABLE, ULAW_TABLE, InputFormat, alaw_to_float32, ulaw_to_float32
from jax_realtime.vad import FRAME, TurnDetector, TurnSettings, VADStream, feed_many, shared


def _encode_ulaw(x: np.ndarray) -> bytes:
    """The nearest µ-law code of each sample (by table search: test-only)."""
    order = np.argsort(ULAW_TABLE)
    values = ULAW_TABLE[order].astype(np.int32)
    pcm = np.clip(np.round(x * 32768), -32768, 32767).astype(np.int32)
    idx = np.clip(np.searchsorted(values, pcm), 1, len(values) - 1)
    nearer = np.where(np.abs(values[idx - 1] - pcm) <= np.abs(values[idx] - pcm), idx - 1, idx)
    return order[nearer].astype(np.uint8).tobytes()


def test_g711_tables_match_the_standard():
    """Spot values of ITU-T G.711 (and Python's audioop where it still exists, before 3.13)."""
    assert ULAW_TABLE[0xFF] == 0 and ULAW_TABLE[0x7F] == 0  # +0 and -0
    assert ULAW_TABLE[0x80] == 32124 and ULAW_TABLE[0x00] == -32124
    assert ALAW_TABLE[0xD5] == 8 and ALAW_TABLE[0x55] == -8
    assert ALAW_TABLE[0xAA] == 32256 and ALAW_TABLE[0x2A] == -32256
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop
    except ImportError:
        return
    codes = bytes(range(256))
    assert np.array_equal(np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2"), ULAW_TABLE)
    assert np.array_equal(np.frombuffer(audioop.alaw2lin(codes, 2), "<i2"), ALAW_TABLE)
    assert np.array_equal(ulaw_to_float32(codes), ULAW_TABLE / 32768.0)
    assert np.array_equal(alaw_to_float32(codes), ALAW_TABLE / 32768.0)


@pytest.mark.parametrize("kind, rate", [("pcm24", 24000), ("pcmu", 8000), ("pcma", 8000)])
def test_input_formats_resample_a_stream_to_16k(kind, rate):
    """A 440 Hz tone sent in 100 ms pieces comes out at 16 kHz, as long as it went in (after the
    flush), and close to the tone itself: the chunk edges leave no trace."""
    import soxr

    seconds = 1.0
    t = np.arange(round(seconds * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    if kind == "pcm24":
        data = np.round(tone * 32767).astype("<i2").tobytes()
        width = 2
    else:
        data = _encode_ulaw(tone)
        if kind == "pcma":  # the same samples, A-law coded
            order = np.argsort(ALAW_TABLE)
            values = ALAW_TABLE[order].astype(np.int32)
            pcm = ULAW_TABLE[np.frombuffer(data, np.uint8)].astype(np.int32)
            idx = np.clip(np.searchsorted(values, pcm), 0, len(values) - 1)
            data = order[idx].astype(np.uint8).tobytes()
        width = 1
    fmt = InputFormat(kind)
    step = round(0.1 * rate) * width
    out = np.concatenate([fmt.decode(data[i:i + step]) for i in range(0, len(data), step)] + [fmt.flush()])
    assert abs(len(out) - 16000 * seconds) <= 1, len(out)
    reference = soxr.resample(tone, rate, 16000)
    middle = slice(800, 15200)
    error = np.sqrt(np.mean((out[middle] - reference[middle]) ** 2)) / np.sqrt(np.mean(reference[middle] ** 2))
    assert error < (0.002 if kind == "pcm24" else 0.05), error


def test_turn_detector_on_probabilities():
    """server_vad on frame probabilities: the start goes back prefix_padding_ms (not before the
    floor), the stop comes silence_duration_ms after the last speech frame."""
    settings = TurnSettings(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    assert settings.silence_frames == 16 and settings.prefix_samples == 4800
    detector = TurnDetector(settings)
    probs = np.array([0.1] * 20 + [0.9] * 30 + [0.2] * 20 + [0.9] * 5 + [0.1] * 16, np.float32)
    events = detector.frames(0, probs[:60]) + detector.frames(60 * FRAME, probs[60:])
    assert events == [("start", 20 * FRAME - 4800), ("stop", (50 + 16) * FRAME), ("start", 66 * FRAME),
                      ("stop", (75 + 16) * FRAME)]  # the second turn's prefix stops at the first one's end
    # a short pause does not end the turn; the prefix never reaches back past the previous turn
    detector = TurnDetector(settings)
    probs = np.array([0.9] * 10 + [0.1] * 10 + [0.9] * 10 + [0.1] * 16 + [0.9] * 2 + [0.1] * 16, np.float32)
    events = detector.frames(0, probs)
    assert events == [("start", 0), ("stop", 46 * FRAME), ("start", 46 * FRAME), ("stop", 64 * FRAME)]


def test_silero_finds_the_turns_of_joined_clips():
    """Three clips with 1.2 s of silence between them: the VAD's turns are the three clips."""
    refs = [r for r in load_refs("ljspeech")][:3]
    gap = np.zeros(round(1.2 * 16000), np.float32)
    parts, spans, at = [gap], [], len(gap)
    for ref in refs:
        clip = load_clip(ref)
        parts += [clip, gap]
        spans.append((at, at + len(clip)))
        at += len(clip) + len(gap)
    audio = np.concatenate(parts)
    (_, probs), = feed_many(shared(), [VADStream()], [audio])
    events = TurnDetector(TurnSettings()).frames(0, probs)
    starts = [s for kind, s in events if kind == "start"]
    stops = [s for kind, s in events if kind == "stop"]
    assert len(starts) == len(stops) == 3, events
    for (a, b), start, stop in zip(spans, starts, stops):
        assert a - 4800 - 1600 <= start <= a + 3200, (a, start)
        assert b <= stop <= b + 8000 + 3200, (b, stop)


class _Handshake:
    def __init__(self, headers=None, args=None):
        self.headers, self.args = headers or {}, args or {}


def test_the_dialect_is_chosen_at_the_handshake():
    from server.openai_realtime import choose, wants_ga

    assert choose(_Handshake()) is None  # vLLM's clients: the bare path
    assert choose(_Handshake(args={"intent": "transcription"})) == {"beta": False, "model": None}
    assert choose(_Handshake(args={"model": "tiny.en"})) == {"beta": False, "model": "tiny.en"}
    assert choose(_Handshake({"OpenAI-Beta": "realtime=v1"}, {"model": "whisper-1"})) == \
        {"beta": True, "model": "whisper-1"}
    assert wants_ga('{"type": "session.update", "session": {"type": "transcription"}}')
    assert not wants_ga('{"type": "session.update", "model": "tiny.en"}')
    assert not wants_ga("not json")
