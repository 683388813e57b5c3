"""Transcripts as files and API bodies: text, JSON, OpenAI's verbose_json, SRT and WebVTT.

One writer per format, shared by the batch script and the REST API so both say the same thing.
With word timestamps, ``verbose_json`` has OpenAI's top-level ``words`` (``word``, ``start``,
``end``, and faster-whisper's ``probability``), and SRT/WebVTT can have one cue per word
(``word_cues``) instead of one per segment.
"""

from __future__ import annotations

import json
import math

from .tokenizer import LANGUAGES
from .longform import Transcript
from .transcribe import word_dict

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


def _cues(t: Transcript, word_cues: bool) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue: the segments, or the words when asked for and present."""
    if word_cues and t.words is not None:
        return [(w.start, w.end, w.word.strip()) for w in t.words]
    return [(s.start, s.end, s.text.strip()) for s in t.segments]


def to_srt(t: Transcript, word_cues: bool = False) -> str:
    cues = []
    for i, (start, end, text) in enumerate(_cues(t, word_cues), start=1):
        cues.append(f"{i}\n{timestamp(start)} --> {timestamp(end)}\n{text}\n")
    return "\n".join(cues)


def to_vtt(t: Transcript, word_cues: bool = False) -> str:
    cues = [f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n" for start, end, text in _cues(t, word_cues)]
    return "WEBVTT\n\n" + "\n".join(cues)


def usage(t: Transcript) -> dict:
    """OpenAI's usage block of an audio-billed answer: the audio's duration in whole seconds, rounded up."""
    return {"type": "duration", "seconds": math.ceil(round(t.duration, 6))}


def verbose(t: Transcript, task: str = "transcribe") -> dict:
    """OpenAI's ``verbose_json`` body (``words`` is null without word timestamps)."""
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
        "words": None if t.words is None else [word_dict(w) for w in t.words],
        "usage": usage(t),
    }


def render(t: Transcript, fmt: str, task: str = "transcribe", word_cues: bool = False) -> str:
    """The transcript in ``fmt`` (one of FORMATS) as a string; ``word_cues``: SRT/WebVTT cues per word."""
    if fmt == "text":
        return to_text(t)
    if fmt == "srt":
        return to_srt(t, word_cues)
    if fmt == "vtt":
        return to_vtt(t, word_cues)
    if fmt == "json":
        return json.dumps({"text": t.text, "usage": usage(t)}, ensure_ascii=False)
    if fmt == "verbose_json":
        return json.dumps(verbose(t, task), ensure_ascii=False)
    raise ValueError(f"unknown format '{fmt}' (one of {', '.join(FORMATS)})")
