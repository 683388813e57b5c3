#!/usr/bin/env python3
"""A soak: N realtime sessions streaming real speech at real time for minutes, with disconnects,
reconnects, clears and REST uploads mixed in, while the server's memory, compilations, errors and
latency are watched.

    python scripts/soak.py                                   # starts a server on configs/cpu-tiny.toml
    python scripts/soak.py --sessions 8 --minutes 10 --json out/soak.json
    python scripts/soak.py --url http://127.0.0.1:8000 --pid 1234 --server-log serve.log

Each of ``--sessions`` sessions loops until the time is up: connect, ``session.update``, then
utterances one after another on the socket.  An utterance is 1-3 English eval clips (``--refs``,
default ``../shared/eval/refs.jsonl``, else ``tests/data``) joined with 0.4 s of silence, streamed
in 100 ms appends on a real-time schedule between ``commit`` and ``commit final``; then the client
waits for ``transcription.done`` and pauses 0-3 s.  Mixed in, at random (seeded, ``--seed``):

* *disconnect* (``--p-disconnect``): the socket is closed mid-utterance (half the time without a
  close handshake) and the session reconnects after 0-2 s;
* *clear before* (``--p-clear``): noise is appended before the ``commit`` and dropped with
  ``input_audio_buffer.clear``: the utterance's text must still be the clips' alone;
* *clear during* (``--p-clear``): ``input_audio_buffer.clear`` mid-utterance (audio not yet decoded is
  dropped, so the text is not checked, only that ``done`` comes);
* a REST client uploads a random clip to ``/v1/audio/transcriptions`` every 10-30 s.

Reported: the server's RSS (``/proc/<pid>/status`` VmRSS every ``--sample-s`` s) over time, the
first sample at or after one minute against the last (growth %, target < 5 %); XLA compilations
(``GET /health`` ``compile.compilations``, end minus start; target 0); errors, expected
(``server_busy`` at connect, REST 503 with Retry-After) and unexpected (any other error event,
close, timeout or HTTP status; target 0); latency: time to first delta, final latency (``done``
after ``final``), and how late appends left this process; correctness: every completed, unclear
utterance's WER against its references (bound ``--max-wer``; one over it is sent again through REST
after the soak, and is correct if the streamed text is within the bound of REST's text of the same
audio: the model's own errors on a short clip are not the server's), and the pooled WER.  The server log's
tracebacks are counted.  Exit status 0 when every target holds.

A started server gets the config with ``admission_control = false``: admission by measured load
on a machine this client shares would refuse sessions at random; the soak tests steady service.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import http.client
import io
import json
import os
import random
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the test harness (tests/harness)
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from fuzz_realtime import Target, tracebacks  # noqa: E402
from harness.realtime_client import ServerProcess, chunk_pcm, compilations, read_health, to_pcm16  # noqa: E402
from harness.service_config import write_config  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "cpu-tiny.toml")
SHARED_REFS = os.path.join(ROOT, "..", "shared", "eval", "refs.jsonl")
TEST_REFS = os.path.join(ROOT, "tests", "data", "refs.jsonl")
SAMPLE_RATE = 16000
CHUNK_S = 0.1
GAP_S = 0.4
EXPECTED_EVENT_CODES = {"server_busy"}


def percentile(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


@dataclasses.dataclass
class Utterance:
    session: int
    clips: list
    reference: str
    audio_s: float
    kind: str  # "plain", "clear_before", "clear_during", "disconnect"
    text: str | None = None
    wer: float | None = None
    first_delta_s: float | None = None
    final_latency_s: float | None = None
    max_send_slip_s: float = 0.0
    offline_text: str | None = None  # REST's text of the same audio (only for one over the WER bound)
    offline_wer: float | None = None  # REST's WER against the references
    wer_vs_offline: float | None = None  # the streamed text against REST's
    outcome: str = "pending"  # done, disconnected, error, timeout, closed


class Soak:
    def __init__(self, target: Target, refs: list[dict], args):
        self.target = target
        self.refs = refs
        self.args = args
        self.rng = random.Random(args.seed)
        self.pcm = {}
        self.utterances: list[Utterance] = []
        self.expected: dict[str, int] = {}
        self.unexpected: list[dict] = []
        self.samples: list[dict] = []
        self.rest: list[dict] = []
        self.connections = 0
        self.reconnects = 0
        self.started = time.monotonic()
        self.deadline = self.started + args.minutes * 60
        from jax_realtime.audio import decode_audio

        for ref in refs:
            self.pcm[ref["id"]] = to_pcm16(decode_audio(ref["wav"]))

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def expect(self, what: str) -> None:
        self.expected[what] = self.expected.get(what, 0) + 1

    def unexpect(self, what: str, **details) -> None:
        self.unexpected.append({"t": self.elapsed(), "what": what, **details})

    # -- one realtime session, reconnecting -----------------------------------------------------
    async def session(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        await asyncio.sleep(index * 1.0 / max(1, self.args.sessions))  # independent users do not start in step
        while time.monotonic() < self.deadline:
            try:
                ws = await connect(self.target.ws_url, open_timeout=30, close_timeout=5, max_size=None,
                                   ping_interval=None, compression=None)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.unexpect("connect_failed", session=index, error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            self.connections += 1
            try:
                await self.utterances_on(ws, index, rng)
            except ConnectionClosed as exc:
                self.unexpect("closed", session=index, code=exc.rcvd.code if exc.rcvd else None)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await ws.close()
            if time.monotonic() < self.deadline:
                self.reconnects += 1
                await asyncio.sleep(rng.uniform(0, 2))

    async def utterances_on(self, ws, index: int, rng: random.Random) -> None:
        events: list[tuple[float, dict]] = []
        arrived = asyncio.Event()
        closed: list = []

        async def read():
            try:
                async for message in ws:
                    events.append((time.perf_counter(), json.loads(message)))
                    arrived.set()
            except ConnectionClosed:
                pass
            finally:
                closed.append(ws.close_code)
                arrived.set()

        reader = asyncio.create_task(read())
        try:
            first = await self.wait(events, arrived, closed, lambda e: True, 30, 0)
            if first is None or events[first][1].get("type") != "session.created":
                event = events[first][1] if first is not None else None
                if event is not None and event.get("code") == "server_busy":
                    self.expect("server_busy")
                else:
                    self.unexpect("no_session_created", session=index, event=event, close=closed)
                return
            await ws.send(json.dumps({"type": "session.update", "model": self.target.model, "language": "en"}))
            if await self.wait(events, arrived, closed, lambda e: e.get("type") == "session.updated", 30, 1) is None:
                self.unexpect("no_session_updated", session=index)
                return
            while time.monotonic() < self.deadline:
                if not await self.utterance(ws, index, rng, events, arrived, closed):
                    return
                await asyncio.sleep(rng.uniform(0, 3))
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    @staticmethod
    async def wait(events, arrived, closed, predicate, timeout, start) -> int | None:
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for i in range(seen, len(events)):
                if predicate(events[i][1]):
                    return i
            seen = len(events)
            if closed:
                return None
            arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await arrived.wait()

    async def utterance(self, ws, index, rng, events, arrived, closed) -> bool:
        """One utterance; False when the socket is done with (a planned disconnect, or it closed)."""
        clips = rng.sample(self.refs, rng.randint(1, 3))
        gap = bytes(2 * round(GAP_S * SAMPLE_RATE))
        pcm = gap.join(self.pcm[c["id"]] for c in clips)
        kind = rng.choices(["plain", "clear_before", "clear_during", "disconnect"],
                           [1 - 2 * self.args.p_clear - self.args.p_disconnect, self.args.p_clear, self.args.p_clear,
                            self.args.p_disconnect])[0]
        u = Utterance(index, [c["id"] for c in clips], " ".join(c["text"] for c in clips),
                      round(len(pcm) / (2 * SAMPLE_RATE), 2), kind)
        self.utterances.append(u)
        start = len(events)
        if kind == "clear_before":  # noise before the commit, then cleared: must not reach the text
            noise = np.random.default_rng(rng.randrange(2 ** 32)).integers(-3000, 3000, SAMPLE_RATE, dtype=np.int16)
            for piece in chunk_pcm(noise.tobytes()):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _b64(piece)}))
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        pieces = chunk_pcm(pcm, CHUNK_S)
        stop_at = rng.randrange(len(pieces)) if kind in ("disconnect", "clear_during") else None
        t0 = time.perf_counter()
        for k, piece in enumerate(pieces):
            due = t0 + k * CHUNK_S
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if closed:
                u.outcome = "closed"
                self.unexpect("closed_mid_utterance", session=index, code=closed[0], clips=u.clips)
                return False
            if k == stop_at and kind == "disconnect":
                u.outcome = "disconnected"
                if rng.random() < 0.5:
                    ws.transport.abort()
                else:
                    await ws.close()
                return False
            if k == stop_at and kind == "clear_during":
                await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": _b64(piece)}))
            u.max_send_slip_s = max(u.max_send_slip_s, time.perf_counter() - due)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        final_sent = time.perf_counter()
        try:
            found = await self.wait(events, arrived, closed, lambda e: e.get("type") in ("transcription.done", "error"),
                                    self.args.done_timeout, start)
            while found is not None and events[found][1].get("type") == "error":
                code = events[found][1].get("code")
                if code in EXPECTED_EVENT_CODES:
                    self.expect(code)
                else:
                    self.unexpect("error_event", session=index, event=events[found][1], clips=u.clips)
                if code == "processing_error":  # replaces the done
                    u.outcome = "error"
                    return True
                found = await self.wait(events, arrived, closed,
                                        lambda e: e.get("type") in ("transcription.done", "error"),
                                        self.args.done_timeout, found + 1)
        except TimeoutError:
            u.outcome = "timeout"
            self.unexpect("no_done", session=index, clips=u.clips, waited_s=self.args.done_timeout)
            return False
        if found is None:
            u.outcome = "closed"
            self.unexpect("closed_before_done", session=index, code=closed[0] if closed else None, clips=u.clips)
            return False
        done_time, done = events[found]
        deltas = [(t, e) for t, e in events[start:found] if e.get("type") == "transcription.delta"]
        u.outcome = "done"
        u.text = done.get("text", "")
        if u.text != "".join(e.get("delta", "") for _, e in deltas):
            self.unexpect("done_is_not_the_deltas", session=index, clips=u.clips)
        u.final_latency_s = round(done_time - final_sent, 3)
        first = next((t for t, e in deltas if e.get("delta")), None)
        u.first_delta_s = round(first - t0, 3) if first is not None else None
        if kind != "clear_during":
            from harness.evaluation import wer

            u.wer = round(wer([u.reference], [u.text]), 1)
        return True

    # -- REST ---------------------------------------------------------------------------------------
    async def rest_client(self) -> None:
        rng = random.Random(self.rng.random())
        from harness.evaluation import wer

        while True:
            await asyncio.sleep(rng.uniform(10, 30))
            if time.monotonic() > self.deadline:
                return
            ref = rng.choice(self.refs)
            status, headers, body, seconds = await asyncio.to_thread(self.upload, ref)
            entry = {"t": self.elapsed(), "clip": ref["id"], "status": status, "seconds": round(seconds, 2)}
            if status == 200:
                text = json.loads(body).get("text", "")
                entry.update(text=text, wer=round(wer([ref["text"]], [text]), 1))
            elif status == 503 and "retry-after" in headers:
                self.expect("rest_503_busy")
            else:
                self.unexpect("rest_status", status=status, body=body[:300].decode("utf-8", "replace"))
            self.rest.append(entry)

    def upload(self, ref: dict):
        return self.upload_pcm(self.pcm[ref["id"]])

    def upload_pcm(self, pcm: bytes):
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.frombuffer(pcm, "<i2"), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        boundary = "soakboundary"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{self.target.model}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="clip.wav"\r\n'
                "Content-Type: audio/wav\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection(self.target.host, self.target.port, timeout=self.args.done_timeout)
        started = time.perf_counter()
        try:
            conn.request("POST", "/v1/audio/transcriptions", body,
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            response = conn.getresponse()
            return (response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(),
                    time.perf_counter() - started)
        except OSError as exc:
            return 0, {}, f"{type(exc).__name__}: {exc}".encode(), time.perf_counter() - started
        finally:
            conn.close()

    # -- the server ---------------------------------------------------------------------------------
    async def monitor(self) -> None:
        while True:
            sample = {"t": self.elapsed(), "rss_mib": self.target.rss_mib()}
            try:
                health = await asyncio.to_thread(read_health, self.target.http_url, 10)
                sample.update(sessions=health["sessions"], queue=health["queue_depth"],
                              compilations=compilations(health))
            except Exception as exc:  # noqa: BLE001 - recorded
                sample["health_error"] = f"{type(exc).__name__}: {exc}"
                if not self.target.alive():
                    self.unexpect("server_died")
                    self.samples.append(sample)
                    return
            self.samples.append(sample)
            if self.args.verbose:
                done = sum(u.outcome == "done" for u in self.utterances)
                print(f"  {sample['t']:7.1f} s  rss {sample['rss_mib']} MiB  sessions {sample.get('sessions')}  "
                      f"utterances done {done}  unexpected {len(self.unexpected)}", flush=True)
            if time.monotonic() > self.deadline + self.args.done_timeout:
                return
            await asyncio.sleep(self.args.sample_s)

    async def run(self) -> dict:
        before = await asyncio.to_thread(read_health, self.target.http_url)
        log_offset = len(self.target.log_text())
        monitor = asyncio.create_task(self.monitor())
        await asyncio.gather(*(self.session(i) for i in range(self.args.sessions)), self.rest_client())
        monitor.cancel()
        await asyncio.gather(monitor, return_exceptions=True)
        await asyncio.sleep(2)
        after = await asyncio.to_thread(read_health, self.target.http_url)
        self.samples.append({"t": self.elapsed(), "rss_mib": self.target.rss_mib(), "sessions": after["sessions"],
                             "queue": after["queue_depth"], "compilations": compilations(after)})
        await self.offline_check()
        count, excerpts = tracebacks(self.target.log_text(), log_offset)
        return self.report(compilations(after) - compilations(before), count, excerpts)

    async def offline_check(self) -> None:
        """For each utterance over the WER bound against its references: the same audio through
        REST (the model's offline transcription, after the soak).  Streaming that gives what the
        model gives offline is correct; the model's own errors on a short clip are not the server's."""
        from harness.evaluation import wer

        gap = bytes(2 * round(GAP_S * SAMPLE_RATE))
        for u in self.utterances:
            if u.wer is None or u.wer <= self.args.max_wer:
                continue
            status, _, body, _ = await asyncio.to_thread(self.upload_pcm, gap.join(self.pcm[c] for c in u.clips))
            if status == 200:
                u.offline_text = json.loads(body).get("text", "")
                u.wer_vs_offline = round(wer([u.offline_text], [u.text]), 1)
                u.offline_wer = round(wer([u.reference], [u.offline_text]), 1)

    def report(self, compiled: int, traceback_count: int, traceback_excerpts: list) -> dict:
        args = self.args
        rss = [(s["t"], s["rss_mib"]) for s in self.samples if s.get("rss_mib") is not None]
        after_minute = [r for t, r in rss if t >= 60.0]
        start = after_minute[0] if after_minute else (rss[0][1] if rss else None)
        end = rss[-1][1] if rss else None
        growth = 100.0 * (end - start) / start if start and end else None
        done = [u for u in self.utterances if u.outcome == "done"]
        checked = [u for u in done if u.wer is not None]
        over = [u for u in checked if u.wer > args.max_wer]  # against the references
        wrong = [u for u in over if u.wer_vs_offline is None or u.wer_vs_offline > args.max_wer]
        from harness.evaluation import word_errors

        errors, words = word_errors([u.reference for u in checked], [u.text for u in checked]) if checked else (0, 0)
        first = [u.first_delta_s for u in done if u.first_delta_s is not None]
        final = [u.final_latency_s for u in done if u.final_latency_s is not None]
        slip = [u.max_send_slip_s for u in self.utterances]
        by_outcome: dict[str, int] = {}
        for u in self.utterances:
            key = f"{u.kind}:{u.outcome}"
            by_outcome[key] = by_outcome.get(key, 0) + 1
        rest_ok = [r for r in self.rest if r["status"] == 200]
        result = {
            "sessions": args.sessions, "minutes": args.minutes, "seed": args.seed,
            "connections": self.connections, "reconnects": self.reconnects,
            "rss_mib": {"first": rss[0][1] if rss else None, "start_after_1_min": start, "end": end,
                        "peak": max((r for _, r in rss), default=None),
                        "growth_pct": None if growth is None else round(growth, 2)},
            "compilations": compiled,
            "errors": {"expected": self.expected, "unexpected": len(self.unexpected),
                       "unexpected_list": self.unexpected[:50]},
            "latency_s": {"first_delta_p50": percentile(first, 50), "first_delta_p95": percentile(first, 95),
                          "final_p50": percentile(final, 50), "final_p95": percentile(final, 95),
                          "final_max": max(final, default=None),
                          "send_slip_p95": percentile(slip, 95), "send_slip_max": max(slip, default=None)},
            "utterances": {"total": len(self.utterances), "done": len(done), "checked": len(checked),
                           "correct": len(checked) - len(wrong), "max_wer": args.max_wer,
                           "over_bound_vs_reference": len(over),
                           "over_bound_but_as_offline": [dataclasses.asdict(u) for u in over if u not in wrong][:20],
                           "pooled_wer": round(100.0 * errors / max(words, 1), 2),
                           "worst_wer": max((u.wer for u in checked), default=None),
                           "audio_s_streamed": round(sum(u.audio_s for u in done), 1),
                           "by_kind_outcome": dict(sorted(by_outcome.items())),
                           "wrong": [dataclasses.asdict(u) for u in wrong[:20]]},
            "rest": {"requests": len(self.rest), "ok": len(rest_ok),
                     # REST is the model's offline transcription: over the bound is the model's error
                     "over_bound": [r for r in rest_ok if r["wer"] > args.max_wer],
                     "seconds_p50": percentile([r["seconds"] for r in rest_ok], 50)},
            "tracebacks": traceback_count, "traceback_excerpts": traceback_excerpts[:3],
            "rss_series": rss,
            "health_series": self.samples,
        }
        result["ok"] = bool(
            growth is not None and growth < args.max_rss_growth and compiled == 0 and not self.unexpected
            and not wrong and traceback_count == 0 and done)
        return result


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_english_refs(path: str) -> list[dict]:
    from harness.evaluation import load_refs

    return [r for r in load_refs(path) if r.get("language", "en") == "en" and r["text"].strip()]


def summary(r: dict) -> str:
    u, lat, rss = r["utterances"], r["latency_s"], r["rss_mib"]
    lines = [
        f"soak: {r['sessions']} sessions for {r['minutes']} min (seed {r['seed']}): {r['connections']} connections "
        f"({r['reconnects']} reconnects)",
        f"  RSS: first {rss['first']} MiB, after 1 min {rss['start_after_1_min']} MiB, end {rss['end']} MiB, "
        f"peak {rss['peak']} MiB, growth {rss['growth_pct']} %",
        f"  compilations {r['compilations']}; tracebacks {r['tracebacks']}",
        f"  errors: expected {r['errors']['expected']}, unexpected {r['errors']['unexpected']}",
        f"  latency: first delta p50 {lat['first_delta_p50']} s p95 {lat['first_delta_p95']} s; final p50 "
        f"{lat['final_p50']} s p95 {lat['final_p95']} s max {lat['final_max']} s; send slip p95 "
        f"{lat['send_slip_p95']} s max {lat['send_slip_max']} s",
        f"  utterances: {u['total']} ({u['by_kind_outcome']}), done {u['done']} ({u['audio_s_streamed']} s of audio), "
        f"checked {u['checked']}, correct {u['correct']} (WER <= {u['max_wer']} % against the references: "
        f"{u['checked'] - u['over_bound_vs_reference']}; the others against REST's text of the same audio), "
        f"pooled WER {u['pooled_wer']} %, worst {u['worst_wer']} %",
        f"  REST: {r['rest']['requests']} uploads, {r['rest']['ok']} ok ({len(r['rest']['over_bound'])} over the WER "
        f"bound against the references: the model's own errors), "
        f"p50 {r['rest']['seconds_p50']} s",
    ]
    for item in r["errors"]["unexpected_list"][:10]:
        lines.append(f"  unexpected: {json.dumps(item)[:400]}")
    for item in u["over_bound_but_as_offline"][:5]:
        lines.append(f"  over the bound, as offline: WER {item['wer']} % ref {item['reference']!r} hyp {item['text']!r}"
                     f" offline {item['offline_text']!r}")
    for item in u["wrong"][:5]:
        lines.append(f"  wrong ({item['kind']}, {item['audio_s']} s): WER {item['wer']} % ref {item['reference']!r} "
                     f"hyp {item['text']!r} "
                     f"offline {item['offline_text']!r}")
    series = r["rss_series"]
    step = max(1, len(series) // 12)
    lines.append("  RSS over time (s: MiB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in series[::step]))
    lines.append("RESULT: " + ("ok" if r["ok"] else "FAILED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (loopback only); default: start one on --config")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id (RSS)")
    ap.add_argument("--server-log", help="with --url: the server's log (tracebacks); else where to write it")
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--admission-control", action="store_true", help="keep the config's admission control")
    ap.add_argument("--refs", default=SHARED_REFS if os.path.exists(SHARED_REFS) else TEST_REFS)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--p-disconnect", type=float, default=0.1, help="share of utterances cut by a disconnect")
    ap.add_argument("--p-clear", type=float, default=0.1, help="share with a clear before, and again during")
    ap.add_argument("--done-timeout", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS and /health every this many seconds")
    ap.add_argument("--max-wer", type=float, default=35.0, help="an utterance is correct at most at this WER, %%")
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="target, %% (after the first minute)")
    ap.add_argument("--json", help="write the whole report here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    refs = load_english_refs(args.refs)
    proc = None
    if args.url:
        target = Target(args.url, pid=args.pid, log_path=args.server_log)
    else:
        tmp = tempfile.mkdtemp(prefix="soak-")
        overrides = {} if args.admission_control else {"admission_control": False}
        config = write_config(os.path.join(tmp, "soak.toml"), base=args.config, **overrides)
        proc = ServerProcess.serve(config, name="soak", log_path=args.server_log or os.path.join(tmp, "server.log"),
                                   env={"JAX_REALTIME_API_KEY": ""})
        print(f"starting a server on {args.config}, log {proc.log_path}", flush=True)
        proc.start()
        print(f"server up in {proc.startup_s:.1f} s (pid {proc.proc.pid}); {len(refs)} clips from {args.refs}",
              flush=True)
        target = Target.of(proc)
    try:
        result = asyncio.run(Soak(target, refs, args).run())
    finally:
        if proc is not None:
            proc.stop()
    result["argv"] = sys.argv
    print(summary(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
