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

On an accelerator (faster-whisper is CPU-only here: ``--systems jax``):

    python scripts/bench_engine.py --systems jax --dtype bfloat16 --batches 1 8 32
    python scripts/bench_engine.py --systems jax --random large-v3 --dtype bfloat16 --windows 30

``--random SIZE`` runs an official model size with random weights (no download: speed and memory
only, no WER).  A random model never ends its text, so each clip is decoded to
``--random-tokens-per-s`` tokens per second of audio (default 3, about what English speech gives).
For every run the engine's device memory is printed: parameters per device and, per compiled
bucket, XLA's figure for the rest of a call (``Engine.memory``).
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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # harness

from jax_realtime.audio import SAMPLE_RATE, decode_audio  # noqa: E402
from harness.evaluation import load_refs, score  # noqa: E402

DEFAULT_REFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval", "refs.jsonl")


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


# openai-whisper's sizes: (n_mels, audio layers, width, heads, text layers); 1500 audio and 448 text positions
SIZES = {
    "tiny": (80, 4, 384, 6, 4), "base": (80, 6, 512, 8, 6), "small": (80, 12, 768, 12, 12),
    "medium": (80, 24, 1024, 16, 24), "large-v2": (80, 32, 1280, 20, 32), "large-v3": (128, 32, 1280, 20, 32),
    "large-v3-turbo": (128, 32, 1280, 20, 4),
}


def random_checkpoint(size: str, tokenizer_model: str):
    """An official model size with random weights and ``tokenizer_model``'s tokenizer and vocabulary."""
    import jax

    from jax_realtime.config import ModelDims
    from jax_realtime.model import param_shapes
    from jax_realtime.weights import Checkpoint, load_checkpoint

    real = load_checkpoint(tokenizer_model)
    n_mels, n_audio_layer, width, heads, n_text_layer = SIZES[size]
    dims = ModelDims(n_mels, real.dims.n_vocab, 1500, width, heads, n_audio_layer, 448, width, heads, n_text_layer)
    rng = np.random.default_rng(0)

    def init(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):  # layer norms
            return np.ones(shape.shape, np.float32)
        return (rng.standard_normal(shape.shape, np.float32) * 0.02).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(init, param_shapes(dims))
    return Checkpoint(f"{size}-random", dims, params, real.tokenizer_file, "random weights")


def bench_jax(audio, batch: int, windows, model: str, cache_dir: str, dtype: str = "float32",
              model_parallelism: int = 1, checkpoint=None, tokens_per_s: float | None = None) -> dict:
    import jax

    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import DecodeRequest, Engine

    config = EngineConfig(model=model, dtype=dtype, batch_buckets=(batch,), window_buckets=tuple(windows),
                          prompt_buckets=(8, 232), cache_dir=cache_dir, model_parallelism=model_parallelism,
                          window_fallback=checkpoint is None)  # random output always looks degenerate
    engine = Engine(config, checkpoint)
    used = [b for b in engine.buckets if b.prompt_len == 8]  # requests without a prompt: prompt bucket 8
    cold = engine.warmup(used)
    restarted = Engine(config, checkpoint)  # a second start: programs come from the persistent cache
    warm = restarted.warmup(used)
    del restarted
    cap = (lambda a: max(1, round(tokens_per_s * len(a) / SAMPLE_RATE))) if tokens_per_s else (lambda a: None)
    requests = [DecodeRequest(a, max_new_tokens=cap(a)) for a in audio]
    engine.decode(requests[: 2 * batch])  # first executions allocate
    results, seconds = timed(lambda: engine.decode(requests))
    memory = engine.memory()
    mib = 2 ** 20
    buckets = ", ".join(f"{b.window_s:g} s {n / mib:.0f}" for b, n in memory["buckets"].items())
    note = (f"compile {cold:.1f} s cold, {warm:.1f} s from cache ({len(used)} buckets); "
            f"MiB per device: params {memory['params'] / mib:.0f}, per call {buckets}")
    tokens = sum(len(r.tokens) for r in results)
    del engine
    jax.clear_caches()
    return {"texts": [r.text for r in results], "seconds": seconds, "tokens": tokens, "note": note}


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
    clips = [{"start": s / SAMPLE_RATE, "end": e / SAMPLE_RATE} for s, e in zip(bounds[:-1], bounds[1:])]  # seconds

    def run(samples, clip_list):
        segments, _ = pipeline.transcribe(samples, beam_size=1, temperature=0.0, without_timestamps=True,
                                          clip_timestamps=clip_list, batch_size=batch)
        texts = [""] * len(clip_list)
        for seg in segments:  # each clip is its own chunk; map a segment back by its middle
            # (its start is rounded to milliseconds and may fall a few samples before its clip)
            middle = (seg.start + seg.end) / 2 * SAMPLE_RATE
            index = int(np.searchsorted(bounds, middle, side="right")) - 1
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
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="jax only")
    parser.add_argument("--model-parallelism", type=int, default=1, help="jax only: devices per model replica")
    parser.add_argument("--random", choices=sorted(SIZES), help="jax only: this size with random weights")
    parser.add_argument("--random-tokens-per-s", type=float, default=3.0)
    parser.add_argument("--limit", type=int, default=0)
    args = parser.parse_args()
    if args.random and args.systems != ["jax"]:
        parser.error("--random runs this engine only: add --systems jax")

    refs = load_refs(args.refs, "en")
    if args.limit:
        refs = refs[: args.limit]
    audio = [decode_audio(r["wav"]) for r in refs]
    total = sum(len(a) for a in audio) / SAMPLE_RATE
    import jax

    print(f"{len(refs)} English clips, {total:.0f} s of audio; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}")
    checkpoint = random_checkpoint(args.random, args.model) if args.random else None
    label = f"{args.random} (random weights)" if args.random else args.model

    rows = []

    def add(name: str, batch: int, row: dict) -> None:
        rows.append((name, batch, row))
        print(f"  done: {name} batch {batch}: {total / row['seconds']:.1f}x", flush=True)

    with tempfile.TemporaryDirectory() as cache_dir:
        for system in args.systems:
            if system == "jax":
                for batch in args.batches:
                    add(f"jax-realtime {label} {args.dtype}, windows {'/'.join(f'{w:g}' for w in args.windows)} s",
                        batch, bench_jax(audio, batch, args.windows, args.model, cache_dir, args.dtype,
                                         args.model_parallelism, checkpoint,
                                         args.random_tokens_per_s if args.random else None))
            elif system == "fw-seq":
                for ct in args.compute_types:
                    add(f"faster-whisper {ct}, sequential", 1, bench_fw_sequential(audio, args.model, ct))
            elif system == "fw-batched":
                for ct in args.compute_types:
                    add(f"faster-whisper {ct}, BatchedInferencePipeline", 8, bench_fw_batched(audio, args.model, ct, 8))
            else:
                parser.error(f"unknown system {system}")

    print(f"\n| system | batch | audio s / wall s | WER % | notes |\n|---|---|---|---|---|")
    for name, batch, row in rows:
        wer = score(refs, dict(zip((r["id"] for r in refs), row["texts"])))["overall"]["wer"]
        wer_cell = "-" if args.random else f"{wer:.2f}"
        if args.random:
            row["note"] += f"; {row['tokens'] / row['seconds']:.0f} tokens/s"
        print(f"| {name} | {batch} | {total / row['seconds']:.1f} | {wer_cell} | {row['note']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
