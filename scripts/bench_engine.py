#!/usr/bin/env python3
"""Engine throughput on the English eval clips, against faster-whisper on the same CPU and weights.

    python scripts/bench_engine.py                      # all systems, ../shared/eval English clips
    python scripts/bench_engine.py --systems jax --batches 1 8

Reports audio-seconds per wall-second (higher is better) and WER for

* this engine at batch buckets 1, 4 and 8 (encoder windows ``--windows``, default 10/20/30 s), with
  its compile time at warm-up: cold (empty compilation cache) and warm (a restart reusing it);
* faster-whisper (CTranslate2) float32 and int8, one clip at a time (``WhisperModel.transcribe``);
* faster-whisper's ``BatchedInferencePipeline`` (batch 8), float32 and int8, given all clips as one
  audio with one ``clip_timestamps`` entry per clip, so that it batches eight clips per call.

Every system decodes greedily (beam 1, temperature 0 only), without timestamps, with no VAD, on
all cores.  The clips are decoded once untimed (warm caches, allocations) and then timed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_realtime.audio import SAMPLE_RATE, decode_audio  # noqa: E402
from jax_realtime.evaluation import load_refs, score  # noqa: E402

DEFAULT_REFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval", "refs.jsonl")


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def bench_jax(audio, batch: int, windows, model: str, cache_dir: str) -> dict:
    import jax

    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import DecodeRequest, Engine

    config = EngineConfig(model=model, batch_buckets=(batch,), window_buckets=tuple(windows), prompt_buckets=(8,),
                          cache_dir=cache_dir)
    engine = Engine(config)
    cold = engine.warmup()
    restarted = Engine(config)  # a second start: programs come from the persistent cache
    warm = restarted.warmup()
    requests = [DecodeRequest(a) for a in audio]
    engine.decode(requests[: 2 * batch])  # first executions allocate
    results, seconds = timed(lambda: engine.decode(requests))
    jax.clear_caches()
    return {"texts": [r.text for r in results], "seconds": seconds,
            "note": f"compile {cold:.1f} s cold, {warm:.1f} s from cache ({len(engine.buckets)} buckets)"}


def _fw_model(model: str, compute_type: str):
    from faster_whisper import WhisperModel

    from jax_realtime.weights import resolve

    return WhisperModel(os.path.dirname(resolve(model).weight_files[0]), device="cpu", compute_type=compute_type,
                        cpu_threads=os.cpu_count() or 1)


def bench_fw_sequential(audio, model: str, compute_type: str) -> dict:
    fw = _fw_model(model, compute_type)

    def run(clips):
        texts = []
        for a in clips:
            segments, _ = fw.transcribe(a, beam_size=1, temperature=0.0, without_timestamps=True, vad_filter=False,
                                        condition_on_previous_text=False)
            texts.append("".join(s.text for s in segments))
        return texts

    run(audio[:2])
    texts, seconds = timed(lambda: run(audio))
    return {"texts": texts, "seconds": seconds, "note": ""}


def bench_fw_batched(audio, model: str, compute_type: str, batch: int) -> dict:
    from faster_whisper import BatchedInferencePipeline

    pipeline = BatchedInferencePipeline(_fw_model(model, compute_type))
    joined = np.concatenate(audio)
    bounds = np.cumsum([0] + [len(a) for a in audio])
    clips = [{"start": int(s), "end": int(e)} for s, e in zip(bounds[:-1], bounds[1:])]

    def run(samples, clip_list):
        segments, _ = pipeline.transcribe(samples, beam_size=1, temperature=0.0, without_timestamps=True,
                                          clip_timestamps=clip_list, batch_size=batch)
        texts = [""] * len(clip_list)
        for seg in segments:  # each clip is its own chunk; map a segment back by its start time
            index = int(np.searchsorted(bounds, seg.start * SAMPLE_RATE + 1, side="right")) - 1
            texts[min(index, len(texts) - 1)] += seg.text
        return texts

    run(np.concatenate(audio[:batch]), clips[:batch])
    texts, seconds = timed(lambda: run(joined, clips))
    return {"texts": texts, "seconds": seconds, "note": "clip_timestamps = one chunk per clip"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--systems", nargs="+", default=["jax", "fw-seq", "fw-batched"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--windows", nargs="+", type=float, default=[10.0, 20.0, 30.0])
    parser.add_argument("--compute-types", nargs="+", default=["float32", "int8"])
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()

    refs = load_refs(args.refs, "en")
    if args.limit:
        refs = refs[: args.limit]
    audio = [decode_audio(r["wav"]) for r in refs]
    total = sum(len(a) for a in audio) / SAMPLE_RATE
    print(f"{len(refs)} English clips, {total:.0f} s of audio; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")

    rows = []
    with tempfile.TemporaryDirectory() as cache_dir:
        for system in args.systems:
            if system == "jax":
                for batch in args.batches:
                    rows.append((f"jax-realtime, windows {'/'.join(f'{w:g}' for w in args.windows)} s", batch,
                                 bench_jax(audio, batch, args.windows, args.model, cache_dir)))
            elif system == "fw-seq":
                for ct in args.compute_types:
                    rows.append((f"faster-whisper {ct}, sequential", 1, bench_fw_sequential(audio, args.model, ct)))
            elif system == "fw-batched":
                for ct in args.compute_types:
                    rows.append((f"faster-whisper {ct}, BatchedInferencePipeline", 8,
                                 bench_fw_batched(audio, args.model, ct, 8)))
            else:
                parser.error(f"unknown system {system}")
            name, batch, row = rows[-1]
            print(f"  done: {name} batch {batch}: {total / row['seconds']:.1f}x", flush=True)

    print(f"\n| system | batch | audio s / wall s | WER % | notes |\n|---|---|---|---|---|")
    for name, batch, row in rows:
        wer = score(refs, dict(zip((r["id"] for r in refs), row["texts"])))["overall"]["wer"]
        print(f"| {name} | {batch} | {total / row['seconds']:.1f} | {wer:.2f} | {row['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
