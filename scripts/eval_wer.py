#!/usr/bin/env python3
"""Word error rate on a refs.jsonl (like shared/eval/refs.jsonl), per corpus and overall.

Either transcribe the clips here with one or more systems, or score hypotheses written earlier:

    python scripts/eval_wer.py --refs ../shared/eval/refs.jsonl --systems jax faster-whisper:float32
    python scripts/eval_wer.py --refs ../shared/eval/refs.jsonl --windows 30 --systems jax
    python scripts/eval_wer.py --refs ../shared/eval/refs.jsonl --hyps out/summary.jsonl

Systems: ``jax`` (this project's engine; ``--windows`` picks its encoder windows, ``--batch`` its
batch bucket) and ``faster-whisper:<compute_type>`` (the same weights through CTranslate2, one clip
at a time, greedy at temperature 0 only, no VAD).  Both decode without timestamps unless
``--timestamps`` is given.  Hypothesis files are jsonl with ``text`` and ``id`` (or ``file``, matched
to the clip's wav name).  Text is normalised with Whisper's English normaliser before scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # harness

from jax_realtime.audio import decode_audio  # noqa: E402
from harness.evaluation import load_refs, score  # noqa: E402

DEFAULT_REFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval", "refs.jsonl")


def run_jax(refs, audio, args) -> dict[str, str]:
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import DecodeRequest, Engine

    config = EngineConfig(model=args.model, batch_buckets=(args.batch,), window_buckets=tuple(args.windows),
                          prompt_buckets=(8, 232))
    engine = Engine(config)
    results = engine.decode([DecodeRequest(a, timestamps=args.timestamps) for a in audio])
    fallbacks = sum(1 for r, a in zip(results, audio) if r.window_s > min(w for w in args.windows if w >= len(a) / 16000))
    print(f"  jax: windows {list(engine.window_buckets)}, {fallbacks} clip(s) re-decoded in a longer window")
    return {row["id"]: r.text for row, r in zip(refs, results)}


def run_faster_whisper(refs, audio, args, compute_type: str) -> dict[str, str]:
    from faster_whisper import WhisperModel

    from jax_realtime.weights import resolve

    model_dir = os.path.dirname(resolve(args.model).weight_files[0])
    model = WhisperModel(model_dir, device="cpu", compute_type=compute_type, cpu_threads=os.cpu_count() or 1)
    out = {}
    for row, a in zip(refs, audio):
        segments, _ = model.transcribe(a, beam_size=1, temperature=0.0, without_timestamps=not args.timestamps,
                                       vad_filter=False, condition_on_previous_text=False)
        out[row["id"]] = "".join(s.text for s in segments)
    return out


def read_hyps(path: str, refs) -> dict[str, str]:
    by_wav = {os.path.basename(r["wav"]): r["id"] for r in refs}
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            key = obj.get("id") or by_wav.get(os.path.basename(obj.get("file", "")))
            if key:
                out[key] = obj.get("text", "")
    return out


def print_table(name: str, table: dict, seconds: float | None) -> None:
    speed = f"  ({seconds:.1f} s)" if seconds is not None else ""
    print(f"\n{name}{speed}")
    print(f"  {'corpus':<45} {'clips':>5} {'words':>6} {'WER %':>7}")
    for corpus, row in sorted(table.items(), key=lambda kv: (kv[0] == "overall", kv[0])):
        print(f"  {corpus:<45} {row['clips']:>5} {row['words']:>6} {row['wer']:>7.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--language", default="en", help="score only clips of this language ('' for all)")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--systems", nargs="*", default=[], help="jax, faster-whisper:float32, faster-whisper:int8")
    parser.add_argument("--hyps", nargs="*", default=[], help="jsonl files of earlier output to score")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--windows", nargs="+", type=float, default=[10.0, 20.0, 30.0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--timestamps", action="store_true")
    parser.add_argument("--json", help="write all tables here")
    args = parser.parse_args()
    if not args.systems and not args.hyps:
        parser.error("give --systems and/or --hyps")

    refs = load_refs(args.refs, args.language or None)
    if args.limit:
        refs = refs[: args.limit]
    audio = [decode_audio(r["wav"]) for r in refs] if args.systems else []
    print(f"{len(refs)} clips from {args.refs}" + (f", {sum(len(a) for a in audio) / 16000:.0f} s of audio" if audio else ""))

    tables = {}
    for system in args.systems:
        started = time.perf_counter()
        if system == "jax":
            hyps = run_jax(refs, audio, args)
        elif system.startswith("faster-whisper"):
            hyps = run_faster_whisper(refs, audio, args, system.partition(":")[2] or "float32")
        else:
            parser.error(f"unknown system {system}")
        tables[system] = score(refs, hyps)
        print_table(system, tables[system], time.perf_counter() - started)
    for path in args.hyps:
        tables[path] = score(refs, read_hyps(path, refs))
        print_table(path, tables[path], None)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(tables, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
