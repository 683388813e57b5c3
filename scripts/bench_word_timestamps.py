#!/usr/bin/env python3
"""What word timestamps cost: the same work with and without them, on the English eval clips.

    python scripts/bench_word_timestamps.py                  # ../shared/eval, 161 English clips
    python scripts/bench_word_timestamps.py --limit 40 --repeats 1

One engine compiled with ``word_timestamps = true`` (default buckets unless ``--batches``/
``--windows``) runs, alternately and ``--repeats`` times each:

* ``decode``: every clip as one ``DecodeRequest`` (timestamp mode, as REST and the file command
  decode), all clips in one ``Engine.decode`` call (batches of the largest bucket), with and
  without ``word_timestamps``;
* ``transcribe``: ``transcribe_batch`` (Whisper's long-form loop with its fallbacks: what REST
  and ``jax-realtime transcribe`` run), with and without ``TranscribeOptions.word_timestamps``;
* ``long-form``: the same on every clip joined into one stream (30 s windows, ~60-100 tokens
  each: the 232-token alignment bucket).

Reported: audio seconds per wall second of each (best of the repeats: the machine may be shared),
the windows decoded (with words, a window that does not end on a single timestamp is followed
from its last word, as in openai-whisper and faster-whisper, which changes how many there are)
and the slowdown with words; and the warm-up, compile time and number of compiled programs of
an engine without and with word timestamps (no persistent compilation cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # harness

from jax_realtime.audio import SAMPLE_RATE, decode_audio  # noqa: E402
from harness.evaluation import load_refs  # noqa: E402

DEFAULT_REFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval", "refs.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch buckets (default: the config's)")
    parser.add_argument("--windows", nargs="+", type=float, default=None, help="window buckets (default: the config's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip-compile", action="store_true", help="do not measure compile times")
    args = parser.parse_args()

    import jax

    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import DecodeRequest, Engine, compile_stats
    from jax_realtime.longform import TranscribeOptions
    from jax_realtime.transcribe import transcribe_batch

    refs = load_refs(args.refs, "en")
    if args.limit:
        refs = refs[: args.limit]
    audio = [decode_audio(r["wav"]) for r in refs]
    total = sum(len(a) for a in audio) / SAMPLE_RATE
    print(f"{len(refs)} English clips, {total:.0f} s of audio; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}")
    buckets = {}
    if args.batches:
        buckets["batch_buckets"] = tuple(args.batches)
    if args.windows:
        buckets["window_buckets"] = tuple(args.windows)

    def config(words: bool) -> EngineConfig:
        return EngineConfig(model="tiny.en", dtype=args.dtype, word_timestamps=words, compilation_cache=False, **buckets)

    if not args.skip_compile:
        for words in (False, True):
            before = compile_stats()
            engine = Engine(config(words))
            seconds = engine.warmup()
            after = compile_stats()
            print(f"warm-up, word timestamps {'on ' if words else 'off'}: {seconds:.1f} s, "
                  f"{after['compilations'] - before['compilations']} programs, "
                  f"{after['compile_seconds'] - before['compile_seconds']:.1f} s compiling", flush=True)
            del engine
            jax.clear_caches()

    engine = Engine(config(True))
    engine.warmup()
    print(f"buckets: batch {list(engine.batch_buckets)}, windows {list(engine.window_buckets)} s, "
          f"word tokens {list(engine.word_token_buckets)}", flush=True)

    def decode(words: bool):
        return engine.decode([DecodeRequest(a, language="en", timestamps=True, word_timestamps=words) for a in audio])

    def transcribe(words: bool):
        return transcribe_batch(engine, audio, TranscribeOptions(language="en", word_timestamps=words))

    stream = np.concatenate(audio)

    def long_form(words: bool):
        return transcribe_batch(engine, [stream], TranscribeOptions(language="en", word_timestamps=words))

    runs = {("decode", False): decode, ("decode", True): decode,
            ("transcribe", False): transcribe, ("transcribe", True): transcribe,
            ("long-form", False): long_form, ("long-form", True): long_form}
    decode(True)  # first executions allocate
    best: dict = {}
    windows: dict = {}
    for repeat in range(args.repeats):
        for (name, words), fn in runs.items():
            compiled = compile_stats()["compilations"]
            started = time.perf_counter()
            out = fn(words)
            seconds = time.perf_counter() - started
            assert compile_stats()["compilations"] == compiled, "compiled while running"
            best[name, words] = min(best.get((name, words), float("inf")), seconds)
            windows[name, words] = sum(getattr(t, "windows", 1) for t in out)  # engine calls per row
            print(f"  run {repeat + 1}: {name} words={'on ' if words else 'off'} {seconds:.2f} s, "
                  f"{windows[name, words]} windows", flush=True)

    print("\n| path | without words | with words | slowdown |\n|---|---|---|---|")
    for name in ("decode", "transcribe", "long-form"):
        off, on = best[name, False], best[name, True]
        print(f"| {name} | {total / off:.1f} audio-s/s ({off:.1f} s, {windows[name, False]} windows) | "
              f"{total / on:.1f} audio-s/s ({on:.1f} s, {windows[name, True]} windows) | {100 * (on / off - 1):+.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
