"""Transcripts as files and API bodies: text, JSON, OpenAI's verbose_json, SRT and WebVTT.

One writer per format, shared by the batch script and the REST API so both say the same thing.
"""

from __future__ import annotations

import json
import math

from .tokenizer import LANGUAGES
from .transcribe import Transcript

FORMATS = ("text", "json", "verbose_json", "srt", "vtt")


def timestamp(seconds: float, separator: str = ",", always_hours: bool = True) -> str:
    """``HH:MM:SS,mmm`` (SRT) or ``HH:MM:SS.mmm`` (WebVTT, with ``separator='.'``)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    head = f"{hours:02d}:" if always_hours or hours else ""
    return f"{head}{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_text(t: Transcript) -> str:
    return t.text + "\n"


def to_srt(t: Transcript) -> str:
    cues = []
    for i, s in enumerate(t.segments, start=1):
        cues.append(f"{i}\n{timestamp(s.start)} --> {timestamp(s.end)}\n{s.text.strip()}\n")
    return "\n".join(cues)


def to_vtt(t: Transcript) -> str:
    cues = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def usage(t: Transcript) -> dict:
    """OpenAI's usage block of an audio-billed answer: the audio's duration in whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(round(t.duration, 6))}


def verbose(t: Transcript, task: str = "transcribe") -> dict:
    """OpenAI's ``verbose_json`` body (``words`` is null: no word-level timestamps)."""
    return {
        "task": task,
        "language": LANGUAGES.get(t.language, t.language),
        "duration": round(t.duration, 3),
        "text": t.text,
        "segments": [
            {
                "id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text, "tokens": s.tokens,
                "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob,
            }
            for s in t.segments
        ],
        "words": None,
        "usage": usage(t),
    }


def render(t: Transcript, fmt: str, task: str = "transcribe") -> str:
    """The transcript in ``fmt`` (one of FORMATS) as a string."""
    if fmt == "text":
        return to_text(t)
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    if fmt == "json":
        return json.dumps({"text": t.text, "usage": usage(t)}, ensure_ascii=False)
    if fmt == "verbose_json":
        return json.dumps(verbose(t, task), ensure_ascii=False)
    raise ValueError(f"unknown format '{fmt}' (one of {', '.join(FORMATS)})")
