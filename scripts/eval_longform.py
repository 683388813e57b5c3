#!/usr/bin/env python3
"""Long-form transcription: WER and speed of the stitching strategies on one long stream.

The stream is the clips of a refs.jsonl (default: the 116 Hi-Fi TTS clips of
``../shared/eval/refs.jsonl``, 5 minutes) joined back to back, ``--repeat`` times (12: one hour).
Each strategy transcribes it as one file; the clips transcribed one by one (each its own file,
batched) are the baseline the long-form WER is compared with.  Every transcript's segments are
checked: inside the audio, start <= end, starts never decreasing.

    python scripts/eval_longform.py                              # 5-minute stream, seek and chunked
    python scripts/eval_longform.py --repeat 12 --no-clips       # the 1-hour file
    python scripts/eval_longform.py --strategies chunked --strides 5 2.5
    python scripts/eval_longform.py --files 8 --no-clips            # many long files at once
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # harness

import numpy as np  # noqa: E402

from jax_realtime.audio import SAMPLE_RATE, decode_audio  # noqa: E402
from harness.evaluation import load_refs, word_errors  # noqa: E402

DEFAULT_REFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval", "refs.jsonl")


def check_segments(transcript, duration: float) -> list[str]:
    problems = []
    previous = 0.0
    for s in transcript.segments:
        if not (0.0 <= s.start <= s.end <= duration + 1e-6):
            problems.append(f"segment {s.id} [{s.start}, {s.end}] outside [0, {duration:.2f}] or reversed")
        if s.start < previous - 1e-6:
            problems.append(f"segment {s.id} starts at {s.start} before the previous start {previous}")
        previous = s.start
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--corpus-prefix", default="hifitts-", help="clips whose id starts with this")
    parser.add_argument("--repeat", type=int, default=1, help="join the clips this many times (12: one hour)")
    parser.add_argument("--strategies", nargs="+", default=["seek", "chunked"], choices=["seek", "chunked"])
    parser.add_argument("--strides", nargs="+", type=float, default=[5.0], help="chunked: overlap on each side (s)")
    parser.add_argument("--files", type=int, default=1,
                        help="transcribe this many copies of the stream together, as separate files")
    parser.add_argument("--no-clips", action="store_true", help="skip the clip-by-clip baseline")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8], help="batch buckets")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()

    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import Engine
    from jax_realtime.longform import TranscribeOptions
    from jax_realtime.transcribe import transcribe_batch

    refs = [r for r in load_refs(args.refs) if r["id"].startswith(args.corpus_prefix)]
    clips = [decode_audio(r["wav"]) for r in refs]
    stream = np.concatenate(clips * args.repeat)
    reference = " ".join(r["text"] for r in refs * args.repeat)
    duration = len(stream) / SAMPLE_RATE
    print(f"{len(refs)} clips x {args.repeat}: {duration:.1f} s of audio" +
          (f", {args.files} files of it" if args.files > 1 else ""), flush=True)

    engine = Engine(EngineConfig(model=args.model, batch_buckets=tuple(args.batch)))
    started = time.perf_counter()
    engine.warmup()
    print(f"engine {engine.name}, buckets {engine.batch_buckets} x {engine.window_buckets} x {engine.prompt_buckets}, "
          f"warm-up {time.perf_counter() - started:.1f} s", flush=True)

    rows = []

    def report(name: str, audio_s: float, wall: float, errors: int, words: int, windows: int, problems: list[str]):
        row = {"run": name, "audio_s": round(audio_s, 1), "wall_s": round(wall, 1), "speed": round(audio_s / wall, 1),
               "wer": round(100.0 * errors / max(words, 1), 2), "errors": errors, "words": words,
               "windows": windows, "segment_problems": problems[:5]}
        rows.append(row)
        print(f"  {name:<24} {row['wall_s']:>8.1f} s  {row['speed']:>6.1f}x realtime  WER {row['wer']:6.2f} %  "
              f"({windows} windows{', ' + str(len(problems)) + ' segment problems' if problems else ''})", flush=True)

    if not args.no_clips:
        options = TranscribeOptions()
        started = time.perf_counter()
        transcripts = transcribe_batch(engine, clips, options)
        wall = time.perf_counter() - started
        errors, words = word_errors([r["text"] for r in refs], [t.text for t in transcripts])
        report("clips one by one", sum(len(c) for c in clips) / SAMPLE_RATE, wall, errors, words,
               sum(t.windows for t in transcripts), [])

    runs = []
    for strategy in args.strategies:
        if strategy == "chunked":
            runs += [(f"chunked (stride {stride:g} s)", TranscribeOptions(strategy="chunked", chunk_stride_s=stride))
                     for stride in args.strides]
        else:
            runs.append(("seek", TranscribeOptions(strategy="seek")))
    for name, options in runs:
        started = time.perf_counter()
        transcripts = transcribe_batch(engine, [stream] * args.files, options)
        wall = time.perf_counter() - started
        errors, words = word_errors([reference] * args.files, [t.text for t in transcripts])
        problems = [p for t in transcripts for p in check_segments(t, duration)]
        report(name, duration * args.files, wall, errors, words, sum(t.windows for t in transcripts), problems)

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"audio_s": duration, "repeat": args.repeat, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
