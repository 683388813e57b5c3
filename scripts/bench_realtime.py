#!/usr/bin/env python3
"""How many concurrent real-time streams a server sustains: N clients on ``/v1/realtime`` at once.

    python scripts/bench_realtime.py                                  # starts a server on configs/cpu-tiny.toml
    python scripts/bench_realtime.py --clients 1 2 4 --seconds 30 --json out/bench.json
    python scripts/bench_realtime.py --url ws://127.0.0.1:8000        # a server already running

For each N in ``--clients`` (run one after another on the same server), N clients connect and each
streams its own audio at real-time pace as ONE utterance: ``session.update``, ``commit``, 100 ms
appends (chunk k sent at t0 + k * 0.1 s, on an absolute schedule so the pace does not drift),
``commit`` with ``final: true``, then wait for ``transcription.done``.  Client i starts
``i * stagger / N`` s after the first (``--stagger``, default 1 s, one stream step: independent users
do not start in lock-step).  Each client's audio is a different slice of the 116 Hi-Fi TTS clips of
``--refs`` joined back to back (no gap), ``--seconds`` long (whole clips, until at least that
much): client i of N starts at the clip where ``i / N`` of the set's 298 s begins, wrapping round,
so the slices do not overlap while N * seconds <= 298 s and start at different places otherwise.

Definitions (all times on this process's monotonic clock, taken when the event loop reads a frame):

* **time to first delta** (TTFD): arrival of the first non-empty ``transcription.delta`` minus the
  send time of the first append.
* **delta lag**, per reference word: arrival time of the delta that carries the word minus the send
  time of the 100 ms chunk that contains the word's end.  A word's end inside its clip is
  estimated by linear interpolation over the clip's duration by character position (end of the
  word's last character / length of the clip's reference text); the delta that carries a
  hypothesis word is the one holding its last letter or digit.  Hypothesis words are aligned to
  reference words with jiwer's word alignment after Whisper's English normaliser
  (``jax_realtime.evaluation.normalize``, applied word by word on both sides so that each
  normalised word keeps its raw word's time); matched and substituted words are timed, deleted
  words are not (``timed`` / ``words``).  The interpolation ignores pauses, so single lags can be
  off by a few hundred ms either way (even negative); percentiles over hundreds of words are what
  it is good for.
* **final latency**: arrival of ``transcription.done`` minus the send time of ``final: true``.
* **WER**: each session's ``done`` text against its slice's references joined by spaces, both
  normalised, pooled over the N sessions (errors / reference words).
* **real time sustained** ("yes"): p95 delta lag < ``--max-lag-p95`` (2 s), p95 final latency <
  ``--max-final-p95`` (1 s), and every session ended with ``done``, no error and ``done`` == the
  joined deltas.
* **compilations**: the server's XLA compilations (``GET /health``, ``compile.compilations``) after
  the N run minus before it; anything but 0 means a shape bucket was missing.
* **send slip**: how late chunks left this process compared with their schedule; if its p95 is
  above 50 ms the client, not the server, was the bottleneck and the run says so.

The machine reported is the one this script runs on (where a started server runs too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from realtime_client import (  # noqa: E402
    ClipSpan,
    ServerProcess,
    StreamRecord,
    compilations,
    default_model,
    join_clips,
    machine,
    read_health,
    stream_audio,
    ws_url_of,
)

from jax_realtime.audio import decode_audio  # noqa: E402
from jax_realtime.evaluation import load_refs, normalize, word_errors  # noqa: E402

DEFAULT_REFS = os.path.join(HERE, "..", "..", "shared", "eval", "refs.jsonl")
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "cpu-tiny.toml")
SLIP_WARN_S = 0.05


# -- the streams ------------------------------------------------------------------------------------

def slices(refs: list[dict], clips: list[np.ndarray], n: int,
           seconds: float) -> list[tuple[np.ndarray, list[ClipSpan]]]:
    """Client i's audio: clips from where ``i / n`` of the set begins, wrapping round, until >= ``seconds``."""
    durations = [len(c) / 16000 for c in clips]
    total = sum(durations)
    starts = np.cumsum([0.0] + durations[:-1])
    out = []
    for i in range(n):
        first = int(np.searchsorted(starts, i * total / n - 1e-9, side="left")) % len(clips)
        picked, length, k = [], 0.0, first
        while length < seconds and len(picked) < 10 * len(clips):
            picked.append(k)
            length += durations[k]
            k = (k + 1) % len(clips)
        out.append(join_clips([refs[j] for j in picked], [clips[j] for j in picked]))
    return out


def normalized_words(text: str) -> list[tuple[str, int]]:
    """Whisper-normalised words of ``text``, each with the character index where its raw word ends
    (the end of its last letter or digit, else of the raw word)."""
    out = []
    for m in re.finditer(r"\S+", text):
        raw = m.group()
        alnum = [i for i, ch in enumerate(raw) if ch.isalnum()]
        end = m.start() + (alnum[-1] + 1 if alnum else len(raw))
        out += [(w, end) for w in normalize(raw).split()]
    return out


def reference_words(spans: list[ClipSpan]) -> list[tuple[str, float]]:
    """(normalised word, estimated end time in the stream) for every word of every clip."""
    words = []
    for span in spans:
        text = span.ref["text"]
        for word, end in normalized_words(text):
            words.append((word, span.start_s + span.duration_s * end / max(len(text), 1)))
    return words


def hypothesis_words(record: StreamRecord) -> list[tuple[str, float]]:
    """(normalised word, arrival time of the delta that carried it) over the joined deltas."""
    text, owner = "", []
    for arrival, delta in record.deltas:
        text += delta
        owner += [arrival] * len(delta)
    return [(w, owner[end - 1]) for w, end in normalized_words(text)]


def word_lags(record: StreamRecord, spans: list[ClipSpan]) -> tuple[list[float], int]:
    """Delta lag of every timed reference word, and the number of reference words."""
    import jiwer

    ref = reference_words(spans)
    hyp = hypothesis_words(record)
    if not ref or not hyp or not record.chunk_sends:
        return [], len(ref)
    out = jiwer.process_words(" ".join(w for w, _ in ref), " ".join(w for w, _ in hyp))
    lags = []
    for chunk in out.alignments[0]:
        if chunk.type in ("equal", "substitute"):
            for m in range(chunk.ref_end_idx - chunk.ref_start_idx):
                _, word_end = ref[chunk.ref_start_idx + m]
                _, arrival = hyp[chunk.hyp_start_idx + m]
                lags.append(arrival - record.chunk_send_time(word_end))
    return lags, len(ref)


# -- one run of N clients ---------------------------------------------------------------------------

def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


async def run_clients(url: str, model: str, streams, stagger: float, done_timeout: float) -> list:
    n = len(streams)

    async def client(i, audio):
        await asyncio.sleep(i * stagger / n)
        try:
            return await stream_audio(url, audio, model, speed=1.0, done_timeout=done_timeout)
        except Exception as exc:  # connection refused, model rejected...
            return exc

    return await asyncio.gather(*(client(i, audio) for i, (audio, _) in enumerate(streams)))


def summarize(n: int, streams, records, compiles: int, args) -> dict:
    sessions, all_lags, ttfd, final, slips = [], [], [], [], []
    errors = words = timed = 0
    for (audio, spans), record in zip(streams, records):
        joined_ref = " ".join(s.ref["text"] for s in spans)
        if isinstance(record, Exception):
            sessions.append({"ok": False, "failure": f"{type(record).__name__}: {record}",
                             "audio_s": len(audio) / 16000})
            e, w = word_errors([joined_ref], [""])
            errors, words = errors + e, words + w
            continue
        lags, n_words = word_lags(record, spans)
        e, w = word_errors([joined_ref], [record.done_text or ""])
        errors, words, timed = errors + e, words + w, timed + len(lags)
        all_lags += lags
        slips += record.send_slip
        if record.time_to_first_delta is not None:
            ttfd.append(record.time_to_first_delta)
        if record.final_latency is not None:
            final.append(record.final_latency)
        consistent = record.done_text is not None and record.done_text == record.text
        sessions.append({
            "ok": record.ok and consistent, "session_id": record.session_id, "audio_s": round(record.audio_s, 2),
            "clips": [s.ref["id"] for s in spans], "ttfd_s": record.time_to_first_delta,
            "final_latency_s": record.final_latency, "lag_p50_s": pct(lags, 50), "lag_p95_s": pct(lags, 95),
            "words": n_words, "timed_words": len(lags), "wer": 100.0 * e / max(w, 1),
            "done_equals_deltas": consistent,
            "errors": [{k: v for k, v in x.items() if k != "time"} for x in record.errors],
            "closed": record.closed, "send_slip_max_s": max(record.send_slip, default=0.0),
            "done_text": record.done_text,
            "deltas": [[round(t - record.first_send, 3), d] for t, d in record.deltas] if record.first_send else [],
        })
    all_ok = all(s["ok"] for s in sessions)
    lag95, final95 = pct(all_lags, 95), pct(final, 95)
    sustained = (all_ok and lag95 is not None and final95 is not None
                 and lag95 < args.max_lag_p95 and final95 < args.max_final_p95)
    return {
        "clients": n, "audio_s_per_client": float(np.mean([len(a) / 16000 for a, _ in streams])),
        "ttfd_p50_s": pct(ttfd, 50), "ttfd_p95_s": pct(ttfd, 95),
        "lag_p50_s": pct(all_lags, 50), "lag_p95_s": lag95,
        "final_p50_s": pct(final, 50), "final_p95_s": final95,
        "wer": 100.0 * errors / max(words, 1), "words": words, "timed_words": timed,
        "sessions_ok": sum(s["ok"] for s in sessions), "compilations": compiles,
        "send_slip_p95_s": pct(slips, 95), "client_bound": bool(slips) and pct(slips, 95) > SLIP_WARN_S,
        "sustained": sustained, "sessions": sessions,
    }


# -- output -----------------------------------------------------------------------------------------

def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict]) -> None:
    print("\n| clients | audio s/client | TTFD p50 | TTFD p95 | lag p50 | lag p95 | final p50 | final p95 | WER % "
          "| ok | compilations | real time |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    for r in results:
        verdict = "yes" if r["sustained"] else "no"
        if r["client_bound"]:
            verdict += " (client-bound)"
        print(f"| {r['clients']} | {r['audio_s_per_client']:.1f} | {fmt(r['ttfd_p50_s'])} | {fmt(r['ttfd_p95_s'])} "
              f"| {fmt(r['lag_p50_s'])} | {fmt(r['lag_p95_s'])} | {fmt(r['final_p50_s'])} | {fmt(r['final_p95_s'])} "
              f"| {r['wer']:.2f} | {r['sessions_ok']}/{r['clients']} | {r['compilations']} | {verdict} |")
    print("\nTimes in seconds.  TTFD: first non-empty delta after the first append.  lag: per reference word, delta "
          "arrival - send time of the chunk holding the word's end.  final: done - final sent.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4, 8, 12], help="values of N, run in turn")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per client (whole clips, at least this)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config of the server this script starts")
    parser.add_argument("--url", help="use this running server (ws://host:port[/v1/realtime]) instead of starting one")
    parser.add_argument("--model", help="model name to ask for (default: the first name /health lists)")
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--corpus-prefix", default="hifitts-", help="clips of refs whose id starts with this")
    parser.add_argument("--stagger", type=float, default=1.0, help="spread the N starts over this many seconds")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between two values of N")
    parser.add_argument("--max-lag-p95", type=float, default=2.0, help="real time needs p95 delta lag below this (s)")
    parser.add_argument("--max-final-p95", type=float, default=1.0,
                        help="real time needs p95 final latency below this (s)")
    parser.add_argument("--done-timeout", type=float, default=120.0, help="give up on a done after this (s)")
    parser.add_argument("--server-log", help="write the started server's log here")
    parser.add_argument("--json", help="write every number (and each session's text) here")
    args = parser.parse_args()

    refs = [r for r in load_refs(args.refs) if r["id"].startswith(args.corpus_prefix)]
    if not refs:
        parser.error(f"no clip in {args.refs} has an id starting with {args.corpus_prefix!r}")
    clips = [decode_audio(r["wav"]) for r in refs]
    info = machine()
    print(f"{len(refs)} clips ({sum(len(c) for c in clips) / 16000:.0f} s) from {args.refs}")
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"load average {info['load_avg_1m']} at start")

    server = None
    if args.url:
        url, config_text = ws_url_of(args.url), None
        print(f"server: {url} (already running; the machine above is the client's)")
    else:
        with open(args.config, encoding="utf-8") as f:
            config_text = f.read()
        print(f"config: {os.path.abspath(args.config)}")
        server = ServerProcess.serve(args.config, log_path=args.server_log)
        server.start()
        url = server.ws_url
        print(f"server: started on {url} in {server.startup_s:.1f} s, log {server.log_path}")
    results = []
    try:
        health = read_health(url)
        model = args.model or default_model(health)
        print(f"model: {model}; /health: {json.dumps({k: health.get(k) for k in ('buckets', 'compile', 'warmup_s')})}")
        if config_text:
            print("\n```toml\n" + config_text.strip() + "\n```")
        for i, n in enumerate(args.clients):
            if i:
                time.sleep(args.pause)
            streams = slices(refs, clips, n, args.seconds)
            before = read_health(url)
            started = time.perf_counter()
            records = asyncio.run(run_clients(url, model, streams, args.stagger, args.done_timeout))
            after = read_health(url)
            result = summarize(n, streams, records, compilations(after) - compilations(before), args)
            result["wall_s"] = time.perf_counter() - started
            results.append(result)
            failures = [s.get("failure") or s.get("errors") or s.get("closed") or "done != deltas"
                        for s in result["sessions"] if not s["ok"]]
            print(f"  N={n}: {result['sessions_ok']}/{n} sessions ok in {result['wall_s']:.1f} s, "
                  f"lag p95 {fmt(result['lag_p95_s'])} s, final p95 {fmt(result['final_p95_s'])} s, "
                  f"WER {result['wer']:.2f} %, {result['compilations']} compilation(s)"
                  + (f"; problems: {failures[:3]}" if failures else ""), flush=True)
    finally:
        if server is not None:
            server.stop()

    print_table(results)
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores; config: "
          + (os.path.abspath(args.config) if not args.url else f"server at {url}")
          + f"; thresholds: lag p95 < {args.max_lag_p95} s, final p95 < {args.max_final_p95} s")
    if any(r["client_bound"] for r in results):
        print(f"warning: the client sent chunks more than {SLIP_WARN_S * 1000:.0f} ms late (p95): "
              "this machine was too busy to pace the streams")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": info, "config": None if args.url else os.path.abspath(args.config),
                       "config_text": config_text, "url": args.url, "model": model,
                       "args": vars(args), "results": results}, f, indent=2)
    return 0 if all(r["compilations"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
