#!/usr/bin/env python3
"""Accuracy of streaming against offline decoding, on many streams over ``/v1/realtime``.

    python scripts/eval_realtime.py                                   # every stream at 1x and 4x
    python scripts/eval_realtime.py --streams ljspeech mixed --paces 4 0
    python scripts/eval_realtime.py --url ws://127.0.0.1:8000 --config configs/cpu-tiny.toml

Streams (the English clips of ``--refs``, joined back to back with no gap, each streamed as ONE
utterance): ``hifitts`` (116 clips, one speaker, one recording chain), ``ljspeech`` (35),
``fleurs-en`` (10; several speakers, Opus-coded, some very quiet), ``lj+fleurs`` (the two, in
``refs.jsonl`` order), and ``mixed`` (every English clip, shuffled with ``--seed``): quiet and loud,
clean and band-limited speakers next to each other.

What it does:

1. **Offline**: each clip is decoded on its own by the library (``Engine(config.engine).decode``,
   one ``DecodeRequest`` per clip), in this process, before any server runs, with the ``[engine]``
   table of ``--config`` (with ``--url``, pass the config the server runs).
2. **Streaming**: per stream and pace, one socket: ``session.update``, ``commit``, 100 ms appends,
   ``commit`` with ``final: true`` right after the last one.  ``--paces``: multiples of real time
   (chunk k sent at t0 + k * 0.1 s / pace); 0 sends as fast as the socket takes them.

Reported per stream and pace, scored with Whisper's English normaliser
(``harness.evaluation``), the stream's ``done`` text against the clips' references joined by
spaces, next to the offline texts joined the same way (the same single-document scoring):

* **stream WER** and **offline WER**, **diff** (stream - offline, points), and the **deletions** of
  each (words of the reference missing from the text: lost speech shows here first);
* checks: diff <= ``--max-diff`` (1.0), stream deletions <= ``--max-deletions`` (1.5) x offline's,
  ``done`` == the joined deltas, no error event, and no compilation in the server during the stream
  (``GET /health``);
* the server's ``jax_realtime_untranscribed_audio_seconds_total`` (audio that left a window without
  text, by reason) during the stream, from ``GET /metrics``.

Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the test harness (tests/harness)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from harness.realtime_client import (  # noqa: E402
    ServerProcess,
    compilations,
    default_model,
    http_url_of,
    join_clips,
    machine,
    read_health,
    stream_audio,
    ws_url_of,
)

from jax_realtime.audio import decode_audio  # noqa: E402
from jax_realtime.config import load_config  # noqa: E402
from harness.evaluation import load_refs, normalize  # noqa: E402

DEFAULT_REFS = os.path.join(HERE, "..", "..", "shared", "eval", "refs.jsonl")
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "cpu-tiny.toml")
STREAMS = ("hifitts", "ljspeech", "fleurs-en", "lj+fleurs", "mixed")


def stream_clips(refs: list[dict], name: str, seed: int) -> list[dict]:
    """The clips of one named stream, in playing order."""
    english = [r for r in refs if r.get("language") == "en"]
    if name == "mixed":
        clips = list(english)
        random.Random(seed).shuffle(clips)
        return clips
    if name == "lj+fleurs":
        return [r for r in english if r["id"].startswith(("ljspeech-", "fleurs-en-"))]
    return [r for r in english if r["id"].startswith(name + "-")]


def score(reference: str, hypothesis: str) -> dict:
    """WER and its parts of one joined document, after Whisper's English normaliser."""
    import jiwer

    ref, hyp = normalize(reference), normalize(hypothesis)
    out = jiwer.process_words(ref, hyp if hyp.strip() else "<empty>")
    words = out.hits + out.substitutions + out.deletions
    errors = out.substitutions + out.deletions + out.insertions
    return {"wer": 100.0 * errors / max(words, 1), "words": words, "deletions": out.deletions,
            "substitutions": out.substitutions, "insertions": out.insertions}


def offline_texts(refs: list[dict], audio: dict, engine_config) -> tuple[dict[str, str], float]:
    """Each clip decoded on its own by the library; (texts by id, seconds)."""
    from jax_realtime.engine import DecodeRequest, Engine

    engine = Engine(engine_config)
    engine.warmup()
    started = time.perf_counter()
    results = engine.decode([DecodeRequest(audio[r["id"]]) for r in refs])
    return {r["id"]: res.text for r, res in zip(refs, results)}, time.perf_counter() - started


def untranscribed(url: str) -> dict[str, float]:
    """The server's untranscribed-audio counters by reason (``GET /metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(http_url_of(url) + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "jax_realtime_untranscribed_audio_seconds":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["reason"]] = sample.value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    parser.add_argument("--paces", nargs="+", type=float, default=[1.0, 4.0],
                        help="multiples of real time; 0 = as fast as the socket takes the audio")
    parser.add_argument("--seed", type=int, default=0, help="order of the 'mixed' stream")
    parser.add_argument("--limit-s", type=float, default=0.0, help="only the first clips of each stream, about this long")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="engine config for offline decoding and a started server")
    parser.add_argument("--url", help="stream to this running server instead of starting one")
    parser.add_argument("--model", help="model name to ask for (default: the first name /health lists)")
    parser.add_argument("--max-diff", type=float, default=1.0, help="allowed stream - offline WER (points)")
    parser.add_argument("--max-deletions", type=float, default=1.5, help="allowed stream / offline deletions")
    parser.add_argument("--done-timeout", type=float, default=600.0)
    parser.add_argument("--server-log", help="write the started server's log here")
    parser.add_argument("--json", help="write the numbers and texts here")
    args = parser.parse_args()

    refs = load_refs(args.refs)
    streams = {}
    for name in args.streams:
        clips, total = [], 0.0
        for r in stream_clips(refs, name, args.seed):
            if args.limit_s and total >= args.limit_s:
                break
            clips.append(r)
            total += r["duration_s"]
        streams[name] = clips
    used = {r["id"]: r for clips in streams.values() for r in clips}
    audio = {cid: decode_audio(r["wav"]) for cid, r in used.items()}
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores; config: {os.path.abspath(args.config)}")

    # 1. offline, before any server runs (the two would share the CPU)
    config = load_config(args.config)
    texts, offline_s = offline_texts(list(used.values()), audio, config.engine)
    print(f"offline: {len(used)} clips decoded one by one in {offline_s:.1f} s")

    # 2. streaming
    server = None
    if args.url:
        url = ws_url_of(args.url)
    else:
        server = ServerProcess.serve(args.config, log_path=args.server_log).start()
        url = server.ws_url
        print(f"server: started on {url} in {server.startup_s:.1f} s, log {server.log_path}")
    rows = []
    try:
        model = args.model or default_model(read_health(url))
        for name, clips in streams.items():
            joined, _ = join_clips(clips, [audio[r["id"]] for r in clips])
            reference = " ".join(r["text"] for r in clips)
            offline = score(reference, " ".join(texts[r["id"]] for r in clips))
            for pace in args.paces:
                before, gaps_before = read_health(url), untranscribed(url)
                started = time.perf_counter()
                record = asyncio.run(stream_audio(url, joined, model, speed=pace, done_timeout=args.done_timeout))
                wall = time.perf_counter() - started
                compiles = compilations(read_health(url)) - compilations(before)
                gaps = {k: round(v - gaps_before.get(k, 0.0), 2) for k, v in untranscribed(url).items()
                        if v - gaps_before.get(k, 0.0) > 0}
                stream = score(reference, record.done_text or "")
                row = {
                    "stream": name, "clips": len(clips), "pace": pace, "audio_s": record.audio_s, "wall_s": wall,
                    "offline": offline, "streamed": stream, "diff": stream["wer"] - offline["wer"],
                    "done_equals_deltas": record.done_text is not None and record.done_text == record.text,
                    "errors": [{k: v for k, v in e.items() if k != "time"} for e in record.errors],
                    "closed": record.closed, "compilations": compiles, "untranscribed_s": gaps,
                    "final_latency_s": record.final_latency, "done_text": record.done_text,
                }
                row["ok"] = (row["diff"] <= args.max_diff
                             and stream["deletions"] <= args.max_deletions * offline["deletions"]
                             and row["done_equals_deltas"] and not row["errors"] and row["closed"] is None
                             and compiles == 0)
                rows.append(row)
                print(f"  {name} at {pace:g}x: WER {stream['wer']:.2f} % (offline {offline['wer']:.2f} %), deletions "
                      f"{stream['deletions']} (offline {offline['deletions']}) in {wall:.1f} s, {compiles} compilation(s)"
                      + (f", errors {row['errors'][:3]}" if row["errors"] else ""), flush=True)
    finally:
        if server is not None:
            server.stop()

    def pace_name(pace):
        return "max" if pace == 0 else f"{pace:g}x"

    print("\n| stream | clips | pace | audio s | offline WER % | stream WER % | diff | offline del | stream del "
          "| no-text audio s | done == deltas | compilations | ok |")
    print("|:---|---:|:---|---:|---:|---:|---:|---:|---:|:---|:---|---:|:---|")
    for r in rows:
        gaps = ", ".join(f"{k} {v:g}" for k, v in sorted(r["untranscribed_s"].items())) or "0"
        print(f"| {r['stream']} | {r['clips']} | {pace_name(r['pace'])} | {r['audio_s']:.1f} "
              f"| {r['offline']['wer']:.2f} | {r['streamed']['wer']:.2f} | {r['diff']:+.2f} "
              f"| {r['offline']['deletions']} | {r['streamed']['deletions']} | {gaps} "
              f"| {'yes' if r['done_equals_deltas'] else 'NO'} | {r['compilations']} | {'yes' if r['ok'] else 'NO'} |")
    print(f"\nChecks: stream - offline <= {args.max_diff} point, stream deletions <= {args.max_deletions} x offline's, "
          "done == deltas, no errors, 0 compilations.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "config": os.path.abspath(args.config), "url": args.url, "args": vars(args),
                       "offline_texts": texts, "streams": {k: [r["id"] for r in v] for k, v in streams.items()},
                       "rows": rows}, fh, indent=2)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
