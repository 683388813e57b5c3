"""Two processes under ``jax.distributed`` (CPU, gloo, localhost) give the same outputs as one.

``scripts/transcribe_batch.py`` runs once as a single process and once as two processes of one
JAX cluster (one CPU device each, so the engine's mesh spans both processes).  The inputs are
uneven on purpose: one ~40 s file (two 30 s windows, the second conditioned on the first) and
short clips, so one process runs out of work early and must keep joining the other's engine calls
with empty batches; a corrupt file fails on one process only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import DATA, ROOT, load_clip, load_refs

pytestmark = pytest.mark.slow

# Small buckets: a 10 s window for the clips (with its fallback) and 30 s for the long file.
BUCKETS = {"batch_buckets": [2], "window_buckets": [10.0, 30.0], "prompt_buckets": [8, 232]}
TIMEOUT = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    audio = root / "in"
    audio.mkdir()
    english = [r for r in load_refs() if r["language"] == "en"]
    long = np.concatenate([load_clip(r) for r in english if r["id"].startswith("ljspeech")])[: 40 * 16000]  # ~39.7 s
    sf.write(audio / "long.wav", long, 16000, subtype="PCM_16")
    for r in english[:4]:
        shutil.copy(DATA / r["wav"], audio / f"{r['id']}.wav")
    (audio / "broken.wav").write_bytes(b"not audio at all")
    config = root / "buckets.toml"
    config.write_text("[engine]\nmodel = \"tiny.en\"\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in BUCKETS.items()))
    return root


def command(root, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "transcribe_batch.py"), str(root / "in"), "-o", str(root / out),
            "--config", str(root / "buckets.toml"), "--no-progress", "-v", *extra]


def outputs(directory) -> dict[str, str]:
    return {os.path.relpath(p, directory): open(p, encoding="utf-8").read()
            for p in sorted(str(q) for q in directory.rglob("*") if q.is_file())}


def rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def test_two_processes_write_what_one_process_writes(inputs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    port = free_port()
    pair = [subprocess.Popen(command(inputs, "two", "--num-processes", "2", "--process-id", str(i),
                                     "--coordinator", f"127.0.0.1:{port}"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    single = subprocess.run(command(inputs, "one"), capture_output=True, text=True, timeout=TIMEOUT, env=env)
    logs = []
    for process in pair:
        try:
            _, stderr = process.communicate(timeout=TIMEOUT)
        finally:
            process.kill()
        logs.append(stderr)
    assert single.returncode == 1, single.stderr  # the broken file
    assert [p.returncode for p in pair] == [1, 1], logs  # every process reports the failure
    for i, log in enumerate(logs):
        assert f"process {i} of 2: 3 of 6 inputs, 2 devices" in log, log

    one, two = outputs(inputs / "one"), outputs(inputs / "two")
    assert sorted(two) == sorted(one)  # the merged summary and nothing left over from the parts
    assert "long.srt" in one and "broken.txt" not in one
    for name in one:
        if name.endswith(".json"):  # probabilities: the rows shared a batch with other rows, float noise
            assert rounded(json.loads(two[name])) == rounded(json.loads(one[name])), name
        else:
            assert two[name] == one[name], name
    summary = [json.loads(line) for line in one["summary.jsonl"].splitlines()]
    assert [r["status"] for r in summary] == ["failed"] + ["done"] * 5  # input order: broken.wav first
    long = json.loads(one["long.json"])
    assert 35.0 < long["duration"] <= 40.0 and long["segments"][-1]["end"] > 35.0
