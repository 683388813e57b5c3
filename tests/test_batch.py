"""Batch transcription (``jax_realtime/batch.py``, ``scripts/transcribe_batch.py``, ``jax-realtime
transcribe``): inputs, the files written, resuming, a bad file skipped, the exit status.

Most tests run :func:`batch.run` on the session's engine; two run the real commands as child
processes with the test buckets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import DATA, ROOT, load_refs
from harness.cues import assert_valid_cues, parse_srt, parse_vtt
from harness.service_config import write_config

from jax_realtime import batch
from jax_realtime.batch import InputError, Input, expand_inputs
from jax_realtime.longform import TranscribeOptions

CLIPS = ["ljspeech-LJ001-0001", "hifitts-6097-astralplane_04_leadbeater_0040", "ljspeech-LJ001-0008"]
REFS = {r["id"]: r for r in load_refs()}


def copy_clip(clip_id: str, dest) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / REFS[clip_id]["wav"], dest)
    return str(dest)


@pytest.fixture
def corpus(tmp_path):
    """recordings/ with two clips (one in a sub-folder) and a corrupt .wav; a third clip elsewhere."""
    root = tmp_path / "recordings"
    copy_clip(CLIPS[0], root / "a.wav")
    copy_clip(CLIPS[1], root / "day2" / "b.wav")
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    (root / "notes.txt").write_text("not audio, not an input")
    copy_clip(CLIPS[2], tmp_path / "elsewhere" / "c.flac.wav")
    return tmp_path


def read_summary(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "summary.jsonl").read_text().splitlines()]


def test_expand_inputs(corpus, tmp_path):
    root = corpus / "recordings"
    items = expand_inputs([str(root)])
    assert [i.name for i in items] == ["a", "broken", "day2/b"]  # recursive, audio extensions only
    assert expand_inputs([str(corpus / "elsewhere" / "*.wav")]) == [
        Input(str(corpus / "elsewhere" / "c.flac.wav"), "c.flac")]
    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"audio": "recordings/a.wav", "id": "first"}\n# a comment\n\nrecordings/day2/b.wav\n'
                        '{"wav": "missing.wav"}\n')
    items = expand_inputs([], str(manifest))
    assert [(os.path.relpath(i.path, tmp_path), i.name) for i in items] == [
        ("recordings/a.wav", "first"), ("recordings/day2/b.wav", "b"), ("missing.wav", "missing")]
    # the same file twice is one input (named where it first came); two files that would write
    # the same outputs are refused
    assert len(expand_inputs([str(root / "a.wav"), str(root / "a.wav")])) == 1
    assert [i.name for i in expand_inputs([str(root), str(root / "day2" / "*.wav")])] == ["a", "broken", "day2/b"]
    copy_clip(CLIPS[2], corpus / "other" / "a.wav")
    with pytest.raises(InputError, match="would both write a"):
        expand_inputs([str(root / "a.wav"), str(corpus / "other" / "a.wav")])
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.mp3")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        expand_inputs([], str(bad))
    bad.write_text('{"audio": "a.wav", "id": "../escape"}\n')
    with pytest.raises(InputError, match="leave the output directory"):
        expand_inputs([], str(bad))


def test_batch_writes_every_format_skips_a_bad_file_and_resumes(tiny_engine, corpus):
    out = corpus / "out"
    items = expand_inputs([str(corpus / "recordings"), str(corpus / "elsewhere")])
    report = batch.run(tiny_engine, items, str(out), TranscribeOptions(), progress=False)
    assert (report.done, report.skipped, report.failed, report.exit_status) == (3, 0, 1, 1)

    summary = read_summary(out)
    assert [row["id"] for row in summary] == [i.name for i in items]  # input order
    by_id = {row["id"]: row for row in summary}
    assert by_id["broken"]["status"] == "failed" and "broken.wav" in by_id["broken"]["error"]
    assert not list(out.glob("broken.*"))
    for name, clip_id in [("a", CLIPS[0]), ("day2/b", CLIPS[1]), ("c.flac", CLIPS[2])]:
        row = by_id[name]
        assert row["status"] == "done" and row["language"] == "en"
        assert row["duration_s"] == pytest.approx(REFS[clip_id]["duration_s"], abs=0.01)
        text = (out / f"{name}.txt").read_text()
        body = json.loads((out / f"{name}.json").read_text())
        assert text.strip() == body["text"] == row["text"] and text.strip()
        assert body["segments"] and body["duration"] == row["duration_s"]
        srt, vtt = parse_srt((out / f"{name}.srt").read_text()), parse_vtt((out / f"{name}.vtt").read_text())
        assert_valid_cues(srt, row["duration_s"])
        assert [c[:2] for c in srt] == [c[:2] for c in vtt] == [(s["start"], s["end"]) for s in body["segments"]]

    # resume: everything done is skipped (and reported with its text); the bad file fails again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*") if p.name != "summary.jsonl"}
    report = batch.run(tiny_engine, items, str(out), TranscribeOptions(), progress=False)
    assert (report.done, report.skipped, report.failed, report.exit_status) == (0, 3, 1, 1)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {r["id"]: r["text"] for r in read_summary(out) if r["status"] == "skipped"} == \
        {k: by_id[k]["text"] for k in ("a", "day2/b", "c.flac")}

    # an input with a missing output is done again; the rest stay skipped
    (out / "day2" / "b.srt").unlink()
    good = [i for i in items if i.name != "broken"]
    report = batch.run(tiny_engine, good, str(out), TranscribeOptions(), progress=False)
    assert (report.done, report.skipped, report.failed, report.exit_status) == (1, 2, 0, 0)
    assert parse_srt((out / "day2" / "b.srt").read_text())
    assert not list(out.rglob(".tmp-*"))  # no temporary file left behind


def test_chosen_formats_only(tiny_engine, corpus):
    out = corpus / "out"
    items = [i for i in expand_inputs([str(corpus / "recordings")]) if i.name == "a"]
    report = batch.run(tiny_engine, items, str(out), TranscribeOptions(), extensions=["srt"], progress=False)
    assert report.exit_status == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.srt", "summary.jsonl"]
    with pytest.raises(ValueError, match="unknown output format"):
        batch.run(tiny_engine, items, str(out), TranscribeOptions(), extensions=["docx"], progress=False)


def test_word_timestamps_in_json_and_word_cues(tiny_engine, corpus):
    """--word-timestamps --cues word: OpenAI's words in the .json, and a SRT/WebVTT cue per word."""
    out = corpus / "out"
    items = [i for i in expand_inputs([str(corpus / "recordings")]) if i.name == "a"]
    report = batch.run(tiny_engine, items, str(out), TranscribeOptions(word_timestamps=True), progress=False,
                       word_cues=True)
    assert report.exit_status == 0
    body = json.loads((out / "a.json").read_text())
    words = body["words"]
    assert len(words) > 10 and all(set(w) == {"word", "start", "end", "probability"} for w in words)
    assert " ".join(w["word"] for w in words) == body["text"]
    expected = [(w["start"], w["end"], w["word"]) for w in words]
    for cues in (parse_srt((out / "a.srt").read_text()), parse_vtt((out / "a.vtt").read_text())):
        assert [(round(a, 2), round(b, 2), t) for a, b, t in cues] == expected
        assert_valid_cues(cues, body["duration"])
    with pytest.raises(ValueError, match="seek"):
        TranscribeOptions(word_timestamps=True, strategy="chunked")


def run_command(argv, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_batch_script_end_to_end(corpus):
    """scripts/transcribe_batch.py on a directory, a glob and a manifest; progress on stderr; exit 1."""
    config = write_config(corpus / "test.toml")
    manifest = corpus / "list.txt"
    manifest.write_text("elsewhere/c.flac.wav\n")
    argv = [sys.executable, str(ROOT / "scripts" / "transcribe_batch.py"), "recordings",
            "recordings/day2/*.wav", "--manifest", str(manifest), "-o", "out", "--config", config]
    done = run_command(argv, corpus)
    assert done.returncode == 1, done.stderr
    assert "broken.wav" in done.stderr and "audio-h" in done.stderr
    assert "3 transcribed, 0 skipped (outputs exist), 1 failed" in done.stderr
    statuses = {r["id"]: r["status"] for r in read_summary(corpus / "out")}
    assert statuses == {"a": "done", "broken": "failed", "day2/b": "done", "c.flac": "done"}
    assert (corpus / "out" / "day2" / "b.vtt").exists()
    # without the bad file and with everything done: nothing to do, exit 0
    again = run_command([sys.executable, str(ROOT / "scripts" / "transcribe_batch.py"), "recordings/a.wav",
                         "-o", "out", "--config", config, "--no-progress"], corpus)
    assert again.returncode == 0, again.stderr
    assert "0 transcribed, 1 skipped" in again.stderr


@pytest.mark.slow
def test_cli_transcribe_directory_to_stdout(corpus):
    """jax-realtime transcribe on a directory without --output-dir prints as for single files
    (--word-timestamps: with their words)."""
    from harness.realtime_client import venv_script

    config = write_config(corpus / "test.toml")
    done = run_command([venv_script("jax-realtime"), "transcribe", "recordings", "--format", "jsonl",
                        "--config", config, "--word-timestamps"], corpus)
    assert done.returncode == 1  # the broken file
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [os.path.basename(r["file"]) for r in rows] == ["a.wav", "broken.wav", "b.wav"]
    assert "error" in rows[1] and rows[0]["text"] and rows[2]["text"]
    for row in (rows[0], rows[2]):
        assert " ".join(w["word"] for w in row["words"]) == row["text"]
        assert all(a["end"] <= b["start"] for a, b in zip(row["words"], row["words"][1:]))
    assert "broken.wav" in done.stderr
