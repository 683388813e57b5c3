"""Offline batch transcription: many inputs to txt, json, srt and vtt files and a jsonl summary.

``jax-realtime transcribe ... --output-dir DIR`` and ``scripts/transcribe_batch.py`` both run
:func:`run`:

* Inputs are files, directories (searched recursively for audio), glob patterns and manifests
  (one path a line, or jsonl objects with ``audio``/``path``/``wav``/``file`` and an optional
  ``id``; relative paths are relative to the manifest).  Each input's outputs are
  ``DIR/NAME.{txt,json,srt,vtt}``, NAME being the id, the path under its directory, or the
  file's name, without extension; two inputs that would write the same NAME are refused up front.
* Resumable: an input whose outputs all exist is skipped (``--overwrite`` redoes it).  Outputs are
  written to a temporary file and renamed, so a crash never leaves a partial file behind.
* A file that cannot be read is reported and skipped; the run goes on and exits with status 1.
* ``DIR/summary.jsonl``: one line per input (``file``, ``id``, ``status`` done/skipped/failed,
  ``duration_s``, ``language``, ``text`` or ``error``), written as inputs finish.
* Progress (stderr): audio hours done of the total, and speed in audio seconds per wall second.
* Several processes (``jax.distributed``; ``--num-processes``/``--process-id``/``--coordinator``):
  every process expands the same inputs (checked), takes every N-th of them (longest first, so
  the shares are even), and the engine batches across the devices of all processes.  Process 0
  shows the progress of its share and writes the merged summary.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Iterator

import numpy as np

from . import formats, sharding
from .audio import AudioError, decode_audio

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")
OUTPUT_FORMATS = {"txt": "text", "json": "verbose_json", "srt": "srt", "vtt": "vtt"}  # extension: formats name
MANIFEST_KEYS = ("audio", "path", "wav", "file")


log = logging.getLogger(__name__)


class InputError(ValueError):
    """Inputs that cannot be planned: a pattern matching nothing, a bad manifest, clashing names."""


@dataclasses.dataclass(frozen=True)
class Input:
    path: str
    name: str  # outputs are DIR/name.<ext>


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


def _read_manifest(manifest: str) -> list[Input]:
    base = os.path.dirname(os.path.abspath(manifest))
    try:
        with open(manifest, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{manifest}: cannot read manifest ({exc})") from exc
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = None
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{manifest}:{number}: not valid JSON ({exc.msg})") from exc
            path = next((row[k] for k in MANIFEST_KEYS if isinstance(row.get(k), str)), None)
            if path is None:
                raise InputError(f"{manifest}:{number}: needs one of the keys {', '.join(MANIFEST_KEYS)}")
            name = row.get("id")
            if name is not None and not isinstance(name, str):
                raise InputError(f"{manifest}:{number}: 'id' must be a string")
        else:
            path = line
        path = os.path.join(base, os.path.expanduser(path))
        out.append(Input(os.path.normpath(path), name or _stem(os.path.basename(path))))
    return out


def expand_inputs(inputs: list[str], manifest: str | None = None) -> list[Input]:
    """Files, directories, glob patterns and a manifest to the list of inputs, in that order."""
    found: list[Input] = []
    for arg in inputs:
        if os.path.isdir(arg):
            for root, dirs, files in os.walk(arg):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(AUDIO_EXTENSIONS):
                        path = os.path.join(root, name)
                        found.append(Input(os.path.normpath(path), _stem(os.path.relpath(path, arg))))
        elif glob.has_magic(arg) and not os.path.exists(arg):
            matches = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"{arg}: the pattern matches no file")
            found += [Input(os.path.normpath(p), _stem(os.path.basename(p))) for p in matches]
        else:  # a file; one that does not exist is reported with the others that cannot be read
            found.append(Input(os.path.normpath(arg), _stem(os.path.basename(arg))))
    if manifest is not None:
        found += _read_manifest(manifest)
    unique, by_name, seen = [], {}, set()
    for item in found:
        name = os.path.normpath(item.name).replace(os.sep, "/")
        if not name or name.startswith("../") or name == ".." or os.path.isabs(name):
            raise InputError(f"{item.path}: output name {item.name!r} would leave the output directory")
        if os.path.abspath(item.path) in seen:
            continue  # the same file given twice (say, by a directory and a pattern): the first name holds
        if name in by_name:
            raise InputError(f"{by_name[name].path} and {item.path} would both write {name}.*: "
                             "give them distinct names with a jsonl manifest ('id')")
        seen.add(os.path.abspath(item.path))
        by_name[name] = item = Input(item.path, name)
        unique.append(item)
    return unique


def outputs(out_dir: str, item: Input, extensions: list[str]) -> list[str]:
    return [os.path.join(out_dir, f"{item.name}.{ext}") for ext in extensions]


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_outputs(out_dir: str, item: Input, transcript, extensions: list[str], task: str,
                  word_cues: bool = False) -> None:
    for ext, path in zip(extensions, outputs(out_dir, item, extensions)):
        _write_atomic(path, formats.render(transcript, OUTPUT_FORMATS[ext], task, word_cues))


def _previous_result(out_dir: str, item: Input) -> dict:
    """What the summary says of a skipped input, read back from its outputs."""
    json_path = os.path.join(out_dir, f"{item.name}.json")
    try:
        with open(json_path, encoding="utf-8") as f:
            body = json.load(f)
        return {"duration_s": body.get("duration"), "language": body.get("language"), "text": body.get("text", "")}
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(out_dir, f"{item.name}.txt"), encoding="utf-8") as f:
            return {"text": f.read().strip()}
    except OSError:
        return {}


def _duration(path: str) -> float:
    import soundfile as sf

    try:
        return float(sf.info(path).duration)
    except (RuntimeError, OSError, ValueError, TypeError):  # unreadable: reported when decoded; 0 s for planning
        return 0.0


def _agree_on_inputs(items: list[Input]) -> None:
    """Every process must have expanded the same inputs (else shares overlap or leave gaps)."""
    digest = hashlib.sha256("\n".join(f"{i.path}\t{i.name}" for i in items).encode()).digest()
    digests = sharding.gather(np.frombuffer(digest, np.uint8))
    if not (digests == digests[0]).all():
        raise InputError("the processes found different inputs: every process must see the same files")


class _Progress:
    """Audio hours done and speed (tqdm); quiet when disabled."""

    def __init__(self, total_s: float, files: int, enabled: bool, description: str):
        from tqdm import tqdm

        self.started = time.perf_counter()
        self.done_s = 0.0
        self.files = files
        self.finished = 0
        self.failed = 0
        self.bar = tqdm(total=round(total_s / 3600, 4), unit="audio-h", disable=not enabled, file=sys.stderr,
                        desc=description, dynamic_ncols=True,
                        bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} audio-h [{elapsed}<{remaining}{postfix}]")
        self._postfix()

    def _postfix(self) -> None:
        wall = time.perf_counter() - self.started
        speed = self.done_s / wall if wall > 0 else 0.0
        self.bar.set_postfix_str(f"{speed:.1f} audio-s/s, files {self.finished}/{self.files}, failed {self.failed}",
                                 refresh=False)

    def advance(self, seconds: float) -> None:
        self.done_s += seconds
        self._postfix()
        self.bar.update(min(seconds / 3600, max(0.0, self.bar.total - self.bar.n)))

    def file_done(self, failed: bool) -> None:
        self.finished += 1
        self.failed += failed
        self._postfix()
        self.bar.refresh()

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


@dataclasses.dataclass
class BatchReport:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    audio_s: float = 0.0
    wall_s: float = 0.0

    @property
    def exit_status(self) -> int:
        return 1 if self.failed else 0


def run(engine, items: list[Input], out_dir: str, options, extensions: list[str] | None = None,
        overwrite: bool = False, max_rows: int | None = None, progress: bool = True,
        word_cues: bool = False) -> BatchReport:
    """Transcribe ``items`` into ``out_dir`` (see the module's docstring); the report counts every
    process's inputs.  Under ``jax.distributed`` every process calls this with the same ``items``.
    ``word_cues``: SRT/WebVTT with a cue per word (needs ``options.word_timestamps``)."""
    from .transcribe import default_rows, run_jobs

    extensions = list(extensions or OUTPUT_FORMATS)
    unknown = [e for e in extensions if e not in OUTPUT_FORMATS]
    if unknown:
        raise ValueError(f"unknown output format(s) {', '.join(unknown)} (choose from {', '.join(OUTPUT_FORMATS)})")
    started = time.perf_counter()
    process, processes = sharding.process_index(), sharding.process_count()
    _agree_on_inputs(items)
    order = {item: i for i, item in enumerate(items)}
    durations = {item: _duration(item.path) for item in items}
    # longest first: a long file's windows start early and short files fill the batch beside them
    ranked = sorted(items, key=lambda item: (-durations[item], order[item]))
    mine = ranked[process::processes]
    log.info("process %d of %d: %d of %d inputs, %d devices", process, processes, len(mine), len(items),
             len(engine.mesh.devices.flat))
    os.makedirs(out_dir, exist_ok=True)
    summary_path = os.path.join(out_dir, "summary.jsonl" if processes == 1 else f"summary.{process}-of-{processes}.jsonl")
    lines: dict[Input, str] = {}
    report = BatchReport()

    todo = []
    for item in mine:
        if not overwrite and all(os.path.exists(p) for p in outputs(out_dir, item, extensions)):
            lines[item] = json.dumps({"file": item.path, "id": item.name, "status": "skipped",
                                      **_previous_result(out_dir, item)}, ensure_ascii=False)
            report.skipped += 1
        else:
            todo.append(item)
    description = "" if processes == 1 else f"process {process}/{processes} "
    bar = _Progress(sum(durations[i] for i in todo), len(todo), progress and process == 0, description)

    def sources() -> Iterator[tuple[Input, object]]:
        for item in todo:
            try:
                yield item, decode_audio(item.path)
            except AudioError as exc:
                yield item, exc

    with open(summary_path, "w", encoding="utf-8") as summary:
        for line in lines.values():
            summary.write(line + "\n")
        summary.flush()
        for item, transcript in run_jobs(engine, sources(), options, max_rows or default_rows(engine),
                                         on_progress=bar.advance):
            entry = {"file": item.path, "id": item.name}
            if isinstance(transcript, Exception):
                error = str(transcript)
                entry.update(status="failed", error=error)
                report.failed += 1
                bar.write(f"error: {error}")
            else:
                try:
                    write_outputs(out_dir, item, transcript, extensions, options.task, word_cues)
                except OSError as exc:
                    entry.update(status="failed", error=f"{item.path}: cannot write outputs ({exc})")
                    report.failed += 1
                    bar.write(f"error: {entry['error']}")
                else:
                    entry.update(status="done", duration_s=round(transcript.duration, 3),
                                 language=transcript.language, text=transcript.text)
                    report.done += 1
                    report.audio_s += transcript.duration
            bar.file_done(entry["status"] == "failed")
            lines[item] = json.dumps(entry, ensure_ascii=False)
            summary.write(lines[item] + "\n")
            summary.flush()
    bar.close()

    if processes > 1:  # one summary, in input order, and the counts of every process
        parts = sharding.gather_bytes(json.dumps({item.name: line for item, line in lines.items()}).encode())
        counts = sharding.gather(np.array([report.done, report.skipped, report.failed, report.audio_s], np.float64))
        report.done, report.skipped, report.failed = (int(x) for x in counts[:, :3].sum(axis=0))
        report.audio_s = float(counts[:, 3].sum())
        if process == 0:
            merged = {}
            for part in parts:
                merged.update(json.loads(part))
            _write_atomic(os.path.join(out_dir, "summary.jsonl"),
                          "".join(merged[item.name] + "\n" for item in items if item.name in merged))
        os.unlink(summary_path)
    else:
        ordered = "".join(lines[item] + "\n" for item in items if item in lines)
        _write_atomic(summary_path, ordered)  # the same lines, in input order
    report.wall_s = time.perf_counter() - started
    return report
