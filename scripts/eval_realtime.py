#!/usr/bin/env python3
"""Accuracy of streaming against offline decoding: the Hi-Fi TTS clips as ONE stream over ``/v1/realtime``.

    python scripts/eval_realtime.py                        # 116 clips, fast then real time, server on cpu-tiny.toml
    python scripts/eval_realtime.py --limit 20 --pace fast
    python scripts/eval_realtime.py --url ws://127.0.0.1:8000 --config configs/cpu-tiny.toml

What it does:

1. **Offline**: each clip is decoded on its own by the library (``Engine(config.engine).decode`` with
   one ``DecodeRequest`` per clip, no timestamps unless ``--offline-timestamps``), in this process,
   with the ``[engine]`` table of ``--config`` (with ``--url``, pass the config the server runs).
2. **Streaming**: the clips joined back to back (no gap) are streamed as one utterance on one socket
   (``session.update``, ``commit``, 100 ms appends, one ``commit`` with ``final: true`` at the end),
   once per ``--pace``: ``realtime`` sends chunk k at t0 + k * 0.1 s; ``fast`` at ``--fast-speed``
   times real time (default 5x; 0 = as fast as the socket takes them, which for more than about
   two minutes of audio overflows the server's ``max_buffer_s`` and is refused with ``buffer_full``).

Reported per pace:

* **stream WER**: the ``done`` text against the clips' references joined by spaces;
* **offline WER**: the offline texts joined by spaces against the same joined references (the same
  single-document scoring, so the two are comparable; the usual per-clip corpus WER is printed
  too), and **difference** = stream - offline (goal: at most ``--max-diff``, 1.0 point absolute,
  worse; streaming doing better than offline passes);
* **first delta vs final**: arrival of the first non-empty delta minus the send time of
  ``final: true`` (must be negative: text flows before the end of the audio); also the time to
  first delta from the first append and the final latency (``done`` - final sent);
* whether ``done`` == the concatenation of the deltas, protocol errors, and the server's
  **compilations** during the stream (``GET /health`` before/after; must be 0).

Text is normalised with Whisper's English normaliser before scoring (``jax_realtime.evaluation``).
Exit status 1 if any check fails (difference, first delta before final, done == deltas, errors,
compilations).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from realtime_client import (  # noqa: E402
    ServerProcess,
    compilations,
    default_model,
    join_clips,
    machine,
    read_health,
    stream_audio,
    ws_url_of,
)

from jax_realtime.audio import decode_audio  # noqa: E402
from jax_realtime.config import load_config  # noqa: E402
from jax_realtime.evaluation import load_refs, score, word_errors  # noqa: E402

DEFAULT_REFS = os.path.join(HERE, "..", "..", "shared", "eval", "refs.jsonl")
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "cpu-tiny.toml")


def joined_wer(reference: str, hypothesis: str) -> tuple[float, int, int]:
    errors, words = word_errors([reference], [hypothesis])
    return 100.0 * errors / max(words, 1), errors, words


def offline(refs, clips, engine_config, timestamps: bool) -> tuple[dict[str, str], float]:
    """Each clip decoded on its own by the library; (texts by id, seconds)."""
    from jax_realtime.engine import DecodeRequest, Engine

    engine = Engine(engine_config)
    started = time.perf_counter()
    results = engine.decode([DecodeRequest(c, timestamps=timestamps) for c in clips])
    seconds = time.perf_counter() - started
    return {r["id"]: res.text for r, res in zip(refs, results)}, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--corpus-prefix", default="hifitts-", help="clips of refs whose id starts with this")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N clips")
    parser.add_argument("--pace", nargs="+", choices=["fast", "realtime"], default=["fast", "realtime"])
    parser.add_argument("--fast-speed", type=float, default=5.0,
                        help="'fast' pace in multiples of real time (0: no pacing)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="engine config for offline decoding and a started server")
    parser.add_argument("--url", help="stream to this running server instead of starting one")
    parser.add_argument("--model", help="model name to ask for (default: the first name /health lists)")
    parser.add_argument("--offline-timestamps", action="store_true", help="decode offline in timestamp mode")
    parser.add_argument("--max-diff", type=float, default=1.0, help="allowed stream - offline WER (points)")
    parser.add_argument("--done-timeout", type=float, default=300.0)
    parser.add_argument("--server-log", help="write the started server's log here")
    parser.add_argument("--json", help="write the numbers and texts here")
    args = parser.parse_args()

    refs = [r for r in load_refs(args.refs) if r["id"].startswith(args.corpus_prefix)]
    if args.limit:
        refs = refs[: args.limit]
    if not refs:
        parser.error("no clips")
    clips = [decode_audio(r["wav"]) for r in refs]
    audio, _ = join_clips(refs, clips)
    reference = " ".join(r["text"] for r in refs)
    info = machine()
    print(f"{len(refs)} clips, one stream of {len(audio) / 16000:.1f} s, from {args.refs}")
    print(f"machine: {info['cpu']}, {info['cores']} cores; config: {os.path.abspath(args.config)}")

    # 1. offline, before any server runs (the two would share the CPU)
    config = load_config(args.config)
    texts, offline_s = offline(refs, clips, config.engine, args.offline_timestamps)
    off_joined = " ".join(texts[r["id"]] for r in refs)
    off_wer, off_errors, words = joined_wer(reference, off_joined)
    off_corpus = score(refs, texts)["overall"]["wer"]
    print(f"offline: WER {off_wer:.2f} % joined ({off_errors}/{words} words), {off_corpus:.2f} % per clip; "
          f"{offline_s:.1f} s for {len(audio) / 16000:.0f} s of audio")

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
        health = read_health(url)
        model = args.model or default_model(health)
        for pace in args.pace:
            speed = 1.0 if pace == "realtime" else args.fast_speed
            before = read_health(url)
            started = time.perf_counter()
            record = asyncio.run(stream_audio(url, audio, model, speed=speed, done_timeout=args.done_timeout))
            wall = time.perf_counter() - started
            compiles = compilations(read_health(url)) - compilations(before)
            hyp = record.done_text or ""
            stream_wer, stream_errors, _ = joined_wer(reference, hyp)
            first = record.first_delta_time
            row = {
                "pace": pace, "speed": speed, "audio_s": record.audio_s, "wall_s": wall,
                "stream_wer": stream_wer, "stream_errors": stream_errors, "offline_wer": off_wer, "words": words,
                "diff": stream_wer - off_wer,
                "ttfd_s": record.time_to_first_delta,
                "first_delta_minus_final_s": (None if first is None or record.final_sent is None
                                              else first - record.final_sent),
                "final_latency_s": record.final_latency,
                "deltas": sum(1 for _, d in record.deltas if d),
                "done_equals_deltas": record.done_text is not None and record.done_text == record.text,
                "errors": [{k: v for k, v in e.items() if k != "time"} for e in record.errors],
                "closed": record.closed, "compilations": compiles, "done_text": record.done_text,
            }
            delta_first = row["first_delta_minus_final_s"]
            row["ok"] = (row["diff"] <= args.max_diff  # better than offline is fine
                         and delta_first is not None and delta_first < 0
                         and row["done_equals_deltas"] and not row["errors"] and row["closed"] is None
                         and compiles == 0)
            rows.append(row)
            shown = "none" if delta_first is None else f"{delta_first:+.2f} s"
            print(f"  {pace} ({speed:g}x): WER {stream_wer:.2f} % in {wall:.1f} s, first delta {shown} "
                  f"from final, {compiles} compilation(s)" + (f", errors {row['errors'][:3]}" if row["errors"] else ""),
                  flush=True)
    finally:
        if server is not None:
            server.stop()

    def f(v, d=2):
        return "–" if v is None else f"{v:.{d}f}"

    print("\n| pace | audio s | stream WER % | offline WER % | diff (pts) | TTFD s | first delta - final s "
          "| final latency s | done == deltas | errors | compilations | ok |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|:---|---:|---:|:---|")
    for r in rows:
        print(f"| {r['pace']} ({r['speed']:g}x) | {r['audio_s']:.1f} | {r['stream_wer']:.2f} | {r['offline_wer']:.2f} "
              f"| {r['diff']:+.2f} | {f(r['ttfd_s'])} | {f(r['first_delta_minus_final_s'])} "
              f"| {f(r['final_latency_s'])} "
              f"| {'yes' if r['done_equals_deltas'] else 'NO'} | {len(r['errors'])} | {r['compilations']} "
              f"| {'yes' if r['ok'] else 'NO'} |")
    print(f"\n{words} reference words; offline per-clip corpus WER {off_corpus:.2f} %; goal: stream - offline <= "
          f"{args.max_diff} point, first delta before final, 0 compilations.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": info, "config": os.path.abspath(args.config), "url": args.url, "args": vars(args),
                       "clips": [r["id"] for r in refs], "reference": reference,
                       "offline": {"wer_joined": off_wer, "wer_per_clip": off_corpus, "seconds": offline_s,
                                   "texts": texts},
                       "streams": rows}, fh, indent=2)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
