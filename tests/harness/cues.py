"""SRT and WebVTT output, parsed and checked (the CLI's, the batch script's and REST's cues)."""

from __future__ import annotations

import re

SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"


def _seconds(match) -> float:
    h, m, s, ms = (int(x) for x in match)
    return h * 3600 + m * 60 + s + ms / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Cues of an SRT file; asserts the format (numbered from 1, ``-->`` lines, text, blank line)."""
    cues = []
    for number, block in enumerate(text.strip().split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(number), block
        times = re.fullmatch(f"{SRT_TIME} --> {SRT_TIME}", lines[1])
        assert times, lines[1]
        assert len(lines) >= 3 and lines[2].strip(), block
        cues.append((_seconds(times.groups()[:4]), _seconds(times.groups()[4:]), " ".join(lines[2:])))
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    assert text.startswith("WEBVTT\n\n")
    cues = []
    for block in text[len("WEBVTT\n\n"):].strip().split("\n\n"):
        lines = block.split("\n")
        times = re.fullmatch(f"{VTT_TIME} --> {VTT_TIME}", lines[0])
        assert times, lines[0]
        assert len(lines) >= 2 and lines[1].strip(), block
        cues.append((_seconds(times.groups()[:4]), _seconds(times.groups()[4:]), " ".join(lines[1:])))
    return cues


def assert_valid_cues(cues, duration: float) -> None:
    assert cues
    previous = 0.0
    for start, end, _ in cues:
        assert 0.0 <= start <= end <= duration + 0.001
        assert start >= previous  # timestamps never go back
        previous = start
