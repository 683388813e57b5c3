"""Offline transcription on the engine.

For now: files of up to 30 s, each decoded in one window, all files batched through the engine's
buckets.  (Long-form audio is split and stitched here too; see the long-form issue.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable

from .audio import CHUNK_LENGTH, SAMPLE_RATE, AudioError, decode_audio
from .engine import DecodeRequest, DecodeResult, Engine


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None
    task: str = "transcribe"
    timestamps: bool = False
    initial_prompt: str | None = None


@dataclasses.dataclass
class FileResult:
    file: str
    result: DecodeResult | None = None
    error: str | None = None

    def as_dict(self, timestamps: bool) -> dict:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        r = self.result
        out = {
            "file": self.file,
            "text": r.text.strip(),
            "language": r.language,
            "duration_s": round(r.duration_s, 3),
            "tokens": r.tokens,
        }
        if timestamps:
            out["segments"] = [
                {"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text.strip()} for s in r.segments
            ]
        return out


def transcribe_files(engine: Engine, paths: Iterable[str | os.PathLike], options: TranscribeOptions) -> list[FileResult]:
    """Decode every file (up to 30 s each) in as few batched engine calls as possible.

    A file that cannot be decoded, or is too long, gets an ``error`` and does not stop the rest.
    """
    files = [os.fspath(p) for p in paths]
    out = [FileResult(f) for f in files]
    prompt = engine.tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else ()
    requests, owners = [], []
    for i, path in enumerate(files):
        try:
            audio = decode_audio(path)
        except AudioError as exc:
            out[i].error = str(exc)
            continue
        if len(audio) > CHUNK_LENGTH * SAMPLE_RATE:
            out[i].error = f"{path}: {len(audio) / SAMPLE_RATE:.1f} s is longer than the {CHUNK_LENGTH} s supported here"
            continue
        requests.append(DecodeRequest(audio, options.language, options.task, options.timestamps, prompt))
        owners.append(i)
    for i, result in zip(owners, engine.decode(requests) if requests else []):
        out[i].result = result
    return out
