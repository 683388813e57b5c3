#!/usr/bin/env python3
"""A protocol fuzzer for a live server: random and mutated ``/v1/realtime`` events and malformed
REST uploads, then a check that the server still works, its memory came back and it logged no
traceback.  Loopback only, seeded, bounded by ``--cases`` and ``--seconds``.

    python scripts/fuzz_realtime.py                          # starts a server on configs/cpu-tiny.toml
    python scripts/fuzz_realtime.py --cases 5000 --seconds 900 --seed 7 --json out/fuzz.json
    python scripts/fuzz_realtime.py --url http://127.0.0.1:8000 --pid 1234 --server-log serve.log

A started server gets the config with ``admission_control = false`` (a fixed ``max_sessions``:
what the fuzzer tests is the protocol, not how much the shared CPU measures free).  With ``--url``
(a loopback address only) the checks that need the process use ``--pid`` (RSS) and
``--server-log`` (tracebacks) when given.

What is sent (``--concurrency`` realtime connections at once, plus ``--rest-workers`` REST clients):

* realtime, one case per frame: valid events (``session.update``, ``input_audio_buffer.append``
  of silence, noise or speech, ``commit`` with and without ``final``, ``clear``) in random orders,
  and the same events with a field mutated (wrong type, null, huge, negative, NaN, unicode, a lone
  surrogate escape, deeply nested, dropped, extra keys), unknown types and OpenAI-protocol events
  (``transcription_session.update``, ``session.update`` with a nested ``session``,
  ``conversation.item.create``, ``response.create``...), text that is not JSON, truncated JSON,
  JSON that is not an object, integers past Python's digit limit, nesting past the recursion
  limit, binary frames, invalid and oversized base64, appends of odd byte length, and
  ``session.update`` with a bad model, prompt, language or task.
* connection shapes: *lockstep* (a probe after every frame), *burst* (one probe after all
  frames), *never-read* (frames whose error events are large, sent by a client that never reads:
  the server must close it with 1008, not buffer without bound), *abrupt* (the TCP connection
  dropped mid-utterance without a close handshake).  A probe is an event of a unique unknown type:
  its ``unknown_event`` error proves every frame before it was handled.  A lockstep or burst
  connection may end with ``commit`` + ``commit final`` and must then get ``transcription.done``
  (or a ``processing_error`` in its place).
* REST (``/v1/audio/transcriptions`` and ``/translations``): missing or duplicated ``file``, garbage
  bytes, WAV headers truncated or lying about their size, wrong part and request content types,
  no or a wrong boundary, a body cut short, oversized form fields and prompts, bad
  ``response_format`` / ``temperature`` / ``language`` / ``model`` / ``stream`` /
  ``timestamp_granularities[]``, the wrong method; a few valid uploads among them.

Outcome of every case: *answered* (an event, a close code or an HTTP status within ``--timeout``),
a *hang* (nothing within the timeout), a *crash* (the server process died or stopped answering
``/health``), a *5xx* (503 with Retry-After is the documented "busy" answer and counted apart),
an *internal error* (``processing_error`` "Internal error: ..." or close 1011: a server bug), or a
*missing error* (a frame that must be refused got no ``error`` event before the probe).

Afterwards: no session left open, a normal session on a real clip transcribes it (WER against
its reference at most ``--max-wer``), no XLA compilation happened, the server's RSS
(``/proc/<pid>/status`` VmRSS, sampled throughout) is back near where it started (end at most
``--max-rss-growth`` % over start), and the log holds no ``Traceback``.  Exit status 0 when all
of that holds.
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
import re
import string
import sys
import tempfile
import time
import urllib.parse
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the test harness (tests/harness)
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from harness.realtime_client import (  # noqa: E402
    ServerProcess,
    compilations,
    default_model,
    http_url_of,
    read_health,
    stream_audio,
    to_pcm16,
    ws_url_of,
)
from harness.service_config import write_config  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "cpu-tiny.toml")
DATA = os.path.join(ROOT, "tests", "data")
CHECK_CLIP = "ljspeech-LJ001-0001"  # 9.7 s; the normal session after the fuzzing
SAMPLE_RATE = 16000
EXPECTED_CLOSES = (1008, 1013)  # slow reader (never-read connections only), server busy
OPENAI_TYPES = [
    "transcription_session.update", "transcription_session.updated", "conversation.item.create",
    "response.create", "response.cancel", "input_audio_buffer.speech_started", "session.created",
    "conversation.item.input_audio_transcription.delta", "input_audio_buffer.committed",
    "transcription.delta", "error", "",
]


# -- configuration ---------------------------------------------------------------------------------

# -- what the server is ----------------------------------------------------------------------------

class Target:
    """The server under test: its addresses, and (when known) its process and log."""

    def __init__(self, url: str, pid: int | None = None, log_path: str | None = None,
                 proc: ServerProcess | None = None):
        host = urllib.parse.urlsplit(http_url_of(url)).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"loopback only: {url!r} is not a local address")
        self.http_url = http_url_of(url)
        self.ws_url = ws_url_of(url)
        parts = urllib.parse.urlsplit(self.http_url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.pid = pid if pid is not None else (proc.proc.pid if proc is not None else None)
        self.log_path = log_path if log_path is not None else (proc.log_path if proc is not None else None)
        self.proc = proc
        self.health = read_health(self.http_url)
        self.model = default_model(self.health)

    @classmethod
    def of(cls, proc: ServerProcess) -> Target:
        return cls(proc.http_url, proc=proc)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.alive()
        if self.pid is not None:
            return os.path.exists(f"/proc/{self.pid}")
        try:
            read_health(self.http_url, timeout=10)
            return True
        except Exception:
            return False

    def rss_mib(self) -> float | None:
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def log_text(self) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


# -- the report --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Report:
    seed: int = 0
    cases: int = 0
    realtime_cases: int = 0
    rest_cases: int = 0
    connections: int = 0
    answered: int = 0
    hangs: int = 0
    crashes: int = 0
    http_5xx: int = 0  # undocumented 5xx (500, 502, 504 ...)
    http_503_busy: int = 0  # documented: 503 with Retry-After (the REST concurrency bound, the queue)
    internal_errors: int = 0  # processing_error "Internal error" or close 1011
    missing_errors: int = 0  # a frame that must be refused got no error event
    refused_connections: int = 0  # server_busy at connect (documented)
    slow_reader_closes: int = 0  # 1008 on a never-read connection (documented)
    never_read_frames: int = 0  # frames the never-read connections sent (each connection is one case)
    finals: int = 0  # utterances ended with final:true that were waited for
    finals_done: int = 0
    seconds: float = 0.0
    event_codes: Counter = dataclasses.field(default_factory=Counter)
    close_codes: Counter = dataclasses.field(default_factory=Counter)
    http_statuses: Counter = dataclasses.field(default_factory=Counter)
    kinds: Counter = dataclasses.field(default_factory=Counter)
    problems: list = dataclasses.field(default_factory=list)  # the first few, with the case that caused them
    rss_start_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_end_mib: float | None = None
    rss_samples: list = dataclasses.field(default_factory=list)  # [seconds, MiB]
    tracebacks: int = 0
    traceback_excerpts: list = dataclasses.field(default_factory=list)
    compilations: int | None = None
    sessions_left: int | None = None
    check: dict = dataclasses.field(default_factory=dict)  # the normal session afterwards
    check_before: dict = dataclasses.field(default_factory=dict)  # the same, before the fuzzing

    def problem(self, what: str, **details) -> None:
        if len(self.problems) < 50:
            self.problems.append({"problem": what, **{k: _short(v) for k, v in details.items()}})

    @property
    def rss_growth_pct(self) -> float | None:
        if self.rss_start_mib and self.rss_end_mib:
            return 100.0 * (self.rss_end_mib - self.rss_start_mib) / self.rss_start_mib
        return None

    def ok(self, max_rss_growth: float) -> bool:
        return (self.crashes == 0 and self.hangs == 0 and self.http_5xx == 0 and self.internal_errors == 0
                and self.missing_errors == 0 and self.tracebacks == 0 and self.check.get("ok", False)
                and not self.compilations and not self.sessions_left
                and (self.rss_growth_pct is None or self.rss_growth_pct <= max_rss_growth))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("event_codes", "close_codes", "http_statuses", "kinds"):
            d[key] = dict(sorted(getattr(self, key).items(), key=lambda kv: str(kv[0])))
        d["rss_growth_pct"] = None if self.rss_growth_pct is None else round(self.rss_growth_pct, 2)
        return d


def _short(value, limit: int = 300):
    if isinstance(value, (bytes, bytearray)):
        value = repr(bytes(value[:limit]))
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"... ({len(value)} chars)"
    return value


# -- frames ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Frame:
    kind: str  # what generated it (for the report)
    data: str | bytes
    must_error: bool = False  # the server must answer it with an error event
    audio_s: float = 0.0  # valid audio it appends


class Clips:
    """Speech to append: the English clips of tests/data as PCM16."""

    def __init__(self):
        from jax_realtime.audio import decode_audio

        self.refs = {}
        self.pcm = {}
        with open(os.path.join(DATA, "refs.jsonl")) as f:
            for line in f:
                ref = json.loads(line)
                if ref.get("language") == "en":
                    self.refs[ref["id"]] = ref
                    self.pcm[ref["id"]] = to_pcm16(decode_audio(os.path.join(DATA, ref["wav"])))
        self.ids = sorted(self.pcm)

    def wav(self, clip_id: str) -> bytes:
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, np.frombuffer(self.pcm[clip_id], "<i2"), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        return buf.getvalue()


class Fuzz:
    """Frame and upload generators on one seeded ``random.Random``."""

    def __init__(self, rng: random.Random, model: str, clips: Clips, max_message_bytes: int = 4 * 1024 * 1024):
        self.rng = rng
        self.model = model
        self.clips = clips
        self.max_message_bytes = max_message_bytes

    # -- values
    def huge_len(self) -> int:
        return self.rng.choice([1_000, 10_000, 100_000, 100_000, 1_000_000])

    def weird_string(self) -> str:
        r = self.rng
        return r.choice([
            "", " ", "\x00", "\u202e\u202dtiny.en", "🙂" * r.randint(1, 500), "é" * 50, "\ufeff", "\uffff",
            "x" * self.huge_len(), "".join(chr(r.randint(1, 0x2FFFF)) for _ in range(r.randint(1, 40))),
            "../../etc/passwd", "tiny.en\n", "TINY.EN", "%s%n{0}", "null", "true", "0", "-1",
        ])

    def bad_value(self):
        r = self.rng
        choice = r.randint(0, 12)
        if choice == 0:
            return None
        if choice == 1:
            return r.choice([True, False])
        if choice == 2:
            return r.choice([0, -1, 1, 2, -2 ** 63, 2 ** 64, 10 ** 30])
        if choice == 3:
            return r.choice([0.5, -1.5, 1e308, -1e-308])
        if choice == 4:
            return [self.bad_value() for _ in range(r.randint(0, 3))]
        if choice == 5:
            return {"a": self.bad_value(), "session": {"model": self.model}}
        if choice == 6:
            nested = None
            for _ in range(r.randint(2, 200)):
                nested = {"x": nested} if r.random() < 0.5 else [nested]
            return nested
        if choice == 7:
            return self.weird_string()
        if choice == 8:
            return "x" * self.huge_len()
        if choice == 9:
            return r.choice(["true", "yes", "maybe", "2", "", "1.0"])
        return self.weird_string()

    def pcm(self, seconds: float, kind: str | None = None) -> bytes:
        r = self.rng
        n = max(1, round(seconds * SAMPLE_RATE))
        kind = kind or r.choice(["silence", "noise", "speech", "speech"])
        if kind == "silence":
            return bytes(2 * n)
        if kind == "noise":
            level = r.choice([30, 300, 3000, 30000])
            return np.random.default_rng(r.randrange(2 ** 32)).integers(-level, level, n, dtype=np.int16).tobytes()
        clip = self.clips.pcm[r.choice(self.clips.ids)]
        start = 2 * r.randrange(max(1, len(clip) // 2 - n))
        return clip[start:start + 2 * n] or bytes(2 * n)

    # -- events
    def valid_event(self, audio_left: float) -> tuple[dict, float]:
        r = self.rng
        k = r.random()
        if k < 0.15:
            event = {"type": "session.update", "model": self.model}
            if r.random() < 0.3:
                event["language"] = r.choice([None, "en"])
            if r.random() < 0.3:
                event["prompt"] = r.choice(["", "Hello.", "Mr. Smith, the printer", "x " * 500])
            if r.random() < 0.2:
                event["partials"] = r.choice([True, False])
            return event, 0.0
        if k < 0.7 and audio_left > 0:
            seconds = min(audio_left, r.choice([0.02, 0.1, 0.1, 0.1, 0.256, 0.5, 1.0]))
            return {"type": "input_audio_buffer.append", "audio": _b64(self.pcm(seconds))}, seconds
        if k < 0.9:
            event = {"type": "input_audio_buffer.commit"}
            if r.random() < 0.8:
                event["final"] = r.random() < 0.4
            return event, 0.0
        return {"type": "input_audio_buffer.clear"}, 0.0

    def mutate(self, event: dict) -> dict:
        r = self.rng
        event = dict(event)
        op = r.randint(0, 5)
        keys = [k for k in event if k != "type"] or ["type"]
        if op == 0:  # one field of the wrong type / size / value
            event[r.choice(keys)] = self.bad_value()
        elif op == 1:  # a field dropped
            event.pop(r.choice(keys), None)
        elif op == 2:  # extra keys (accepted and ignored), maybe a nested OpenAI session
            event[r.choice(["event_id", "session", "item", "input_audio_transcription", "x" * 100])] = self.bad_value()
        elif op == 3:  # the type itself
            event["type"] = r.choice([self.bad_value(), event["type"].upper(), event["type"] + " ",
                                      r.choice(OPENAI_TYPES)])
        elif op == 4:  # session.update with a bad model / prompt / language / task
            event = {"type": "session.update", "model": self.model}
            field = r.choice(["model", "prompt", "language", "task", "partials"])
            event[field] = r.choice([
                self.bad_value(), "x" * r.choice([4097, 10_000, 200_000]), "xx", "german", "de", "EN", "translate",
                "whisper-large-v3", "tiny.en ", "",
            ])
        else:  # every field mutated
            for key in keys:
                event[key] = self.bad_value()
        return event

    def frame(self, audio_left: float) -> Frame:
        r = self.rng
        k = r.random()
        if k < 0.35:
            event, seconds = self.valid_event(audio_left)
            return Frame("valid:" + event["type"], json.dumps(event), audio_s=seconds)
        if k < 0.6:
            event, _ = self.valid_event(0.0 if r.random() < 0.5 else min(audio_left, 0.1))
            return Frame("mutated:" + str(event["type"]), _dumps(self.mutate(event)))
        if k < 0.65:
            return self.openai_frame()
        if k < 0.78:
            return self.bad_audio()
        if k < 0.82:
            return self.surrogate()
        return self.raw()

    def openai_frame(self) -> Frame:
        r = self.rng
        model = r.choice([self.model, "gpt-4o-transcribe", "whisper-1"])
        events = [
            ({"type": "transcription_session.update", "session": {
                "input_audio_format": "pcm16", "input_audio_transcription": {"model": model, "language": "en"},
                "turn_detection": {"type": "server_vad"}}}, True),
            ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "transcription": {"model": model}}}}}, True),  # nested: no model at the top: invalid_event
            ({"type": "input_audio_buffer.clear"}, False),  # the extension: accepted
            ({"type": "input_audio_buffer.commit", "event_id": "event_123"}, False),
            ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": []}}, True),
            ({"type": "response.create", "response": {"modalities": ["text"]}}, True),
            ({"type": "response.cancel"}, True),
            ({"type": "input_audio_buffer.append", "audio": _b64(self.pcm(0.05, "silence")),
              "event_id": "event_456"}, False),
        ]
        event, must_error = r.choice(events)
        return Frame("openai:" + event["type"], json.dumps(event), must_error=must_error)

    def bad_audio(self) -> Frame:
        r = self.rng
        k = r.randint(0, 8)
        if k == 0:  # odd byte count
            audio = _b64(self.pcm(0.1)[: 2 * r.randint(0, 1600) + 1])
        elif k == 1:  # not base64
            audio = "".join(r.choice(string.printable) for _ in range(r.randint(1, 4000)))
            if re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", audio):
                audio += "!"
        elif k == 2:  # bad padding
            audio = _b64(self.pcm(0.1))[:-1] + "==="
        elif k == 3:  # whitespace inside
            data = _b64(self.pcm(0.1))
            audio = data[:100] + "\n" + data[100:]
        elif k == 4:  # empty
            audio = ""
        elif k == 5:  # over max_message_bytes
            audio = _b64(bytes(self.max_message_bytes + 2))
        elif k == 6:  # urlsafe alphabet
            audio = base64.urlsafe_b64encode(bytes(range(250)) * 13).decode().replace("=", "") + "-_"
        elif k == 7:  # non-ascii
            audio = "ÄÖÜ" * r.randint(1, 100)
        else:  # one byte
            audio = _b64(b"\x01")
        return Frame("bad_audio", json.dumps({"type": "input_audio_buffer.append", "audio": audio}), must_error=True)

    def surrogate(self) -> Frame:
        """Lone UTF-16 surrogates as JSON escapes: valid JSON, but not text that UTF-8 can carry."""
        r = self.rng
        s = r.choice(["\\ud800", "\\udfff", "a\\udc00b", "\\ud83d", "x\\ud800\\ud800"])
        template = r.choice([
            '{"type": "%s"}', '{"type": "session.update", "model": "%s"}',
            '{"type": "session.update", "model": "MODEL", "prompt": "%s"}',
            '{"type": "session.update", "model": "MODEL", "language": "%s"}',
            '{"type": "input_audio_buffer.append", "audio": "%s"}', '{"type": "input_audio_buffer.commit", "x": "%s"}',
        ])
        text = template.replace("MODEL", self.model) % s
        return Frame("surrogate", text)

    def raw(self) -> Frame:
        r = self.rng
        k = r.randint(0, 11)
        if k == 0:
            return Frame("raw:binary", bytes(r.getrandbits(8) for _ in range(r.randint(0, 2000))), must_error=True)
        if k == 1:
            return Frame("raw:binary_json", json.dumps({"type": "session.update", "model": self.model}).encode(),
                         must_error=True)
        if k == 2:  # truncated JSON: a strict prefix of an object is never valid
            event, _ = self.valid_event(0.1)
            text = json.dumps(event)
            return Frame("raw:truncated", text[: r.randrange(len(text))], must_error=True)
        if k == 3:  # not JSON
            text = "".join(r.choice(string.printable) for _ in range(r.randint(1, 300)))
            return Frame("raw:not_json", "\x01" + text, must_error=True)
        if k == 4:  # JSON, not an object
            return Frame("raw:not_object", json.dumps(r.choice([[], [1, 2], 1, -1.5, "x", None, True,
                                                               [{"type": "session.update"}]])), must_error=True)
        if k == 5:  # an integer past Python's str -> int digit limit
            return Frame("raw:huge_int", '{"type": "input_audio_buffer.commit", "final": ' + "9" * 5000 + "}",
                         must_error=True)
        if k == 6:  # nesting past the recursion limit
            depth = r.choice([1500, 100_000])
            return Frame("raw:deep", "[" * depth + "]" * depth, must_error=True)
        if k == 7:  # NaN / Infinity (Python's json accepts them)
            return Frame("raw:nan", '{"type": "input_audio_buffer.commit", "final": %s}' % r.choice(
                ["NaN", "Infinity", "-Infinity"]), must_error=True)
        if k == 8:  # unknown type, maybe huge
            return Frame("raw:unknown_type", json.dumps({"type": r.choice(["x" * self.huge_len(), "foo", "🙂"])}),
                         must_error=True)
        if k == 9:  # no type
            return Frame("raw:no_type", json.dumps({"model": self.model, "audio": ""}), must_error=True)
        if k == 10:  # empty / whitespace
            return Frame("raw:empty", r.choice(["", " ", "\n"]), must_error=True)
        return Frame("raw:duplicate_keys", '{"type": "session.update", "type": "nope", "model": "%s"}' % self.model,
                     must_error=True)

    # -- REST
    def rest_case(self) -> tuple[str, dict]:
        """(kind, request): ``method``, ``path``, ``body`` (bytes), ``headers``."""
        r = self.rng
        path = "/v1/audio/transcriptions" if r.random() < 0.8 else "/v1/audio/translations"
        boundary = "fuzz" + "".join(r.choice(string.ascii_letters) for _ in range(12))
        clip = self.clips.wav(r.choice(self.clips.ids[:6]))  # short clips
        fields: dict = {"model": self.model}
        files: list = [("file", "clip.wav", "audio/wav", clip)]
        kind = r.choice([
            "missing_file", "garbage", "truncated_header", "lying_header", "part_content_type", "request_content_type",
            "no_boundary", "wrong_boundary", "cut_body", "huge_field", "huge_prompt", "bad_response_format",
            "bad_temperature", "bad_language", "bad_model", "bad_stream", "word_timestamps", "wrong_method",
            "empty_body", "duplicate_file", "field_as_file", "invalid_utf8_field", "valid", "valid_stream",
        ])
        content_type = None
        method = "POST"
        if kind == "missing_file":
            files = []
        elif kind == "garbage":
            files = [("file", r.choice(["a.wav", "a.mp3", "a.flac", "a", "a.webm", "a.m4a"]), "audio/wav",
                      bytes(r.getrandbits(8) for _ in range(r.randint(0, 20000))))]
        elif kind == "truncated_header":
            files = [("file", "t.wav", "audio/wav", clip[: r.randint(0, 60)])]
        elif kind == "lying_header":
            header = bytearray(clip[:44])
            header[40:44] = r.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x00\x00\x7f"])
            if r.random() < 0.5:
                header[24:28] = r.choice([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x01\x00\x00\x00"])
            if r.random() < 0.3:
                header[22:24] = r.choice([b"\x00\x00", b"\xff\xff"])  # channels
            files = [("file", "l.wav", "audio/wav", bytes(header) + clip[44: 44 + r.randint(0, 3200)])]
        elif kind == "part_content_type":
            files = [("file", r.choice(["clip.wav", "clip.txt", "", "clip"]),
                      r.choice(["text/plain", "application/json", "image/png", "", "audio/mpeg"]), clip)]
        elif kind == "request_content_type":
            content_type = r.choice(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "audio/wav", "multipart/mixed; boundary=" + boundary, ""])
        elif kind == "no_boundary":
            content_type = "multipart/form-data"
        elif kind == "wrong_boundary":
            content_type = "multipart/form-data; boundary=somethingelse"
        elif kind == "huge_field":
            fields["x" * r.choice([10, 5000])] = "y" * r.choice([70_000, 1_000_000])
        elif kind == "huge_prompt":
            fields["prompt"] = r.choice(["word " * 1000, "x" * 4097, "🙂" * 5000])
        elif kind == "bad_response_format":
            fields["response_format"] = r.choice(["xml", "JSON", "", "verbose", "srt ", "🙂", "x" * 1000])
        elif kind == "bad_temperature":
            fields["temperature"] = r.choice(["abc", "-1", "2", "nan", "inf", "-inf", "1e400", "", "0x10", "1,5"])
        elif kind == "bad_language":
            fields["language"] = r.choice(["xx", "german", "de", "EN ", "🙂", "x" * 1000, "english", "zh-CN", "\x00"])
        elif kind == "bad_model":
            fields["model"] = r.choice(["whisper-1", "", "x" * 1000, "tiny.en\x00", "../tiny.en"])
        elif kind == "bad_stream":
            fields["stream"] = r.choice(["maybe", "2", "true", "1"])
            fields["response_format"] = r.choice(["srt", "json", "vtt"])
        elif kind == "word_timestamps":
            fields["timestamp_granularities[]"] = r.choice(["word", "sentence", "segment"])
        elif kind == "wrong_method":
            method = r.choice(["GET", "PUT", "DELETE", "PATCH"])
        elif kind == "duplicate_file":
            files = files + [("file", "b.wav", "audio/wav", bytes(100))]
        elif kind == "field_as_file":
            files = []
            fields["file"] = "not a file"
        elif kind == "valid_stream":
            fields["stream"] = "true"
        body = _multipart(fields, files, boundary)
        if kind == "invalid_utf8_field":
            body = body.replace(b'name="model"\r\n\r\n', b'name="prompt"\r\n\r\n\xff\xfe\xc3(\r\n--' +
                                boundary.encode() + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n', 1)
        if kind == "cut_body":
            body = body[: r.randrange(len(body))]
        if kind == "empty_body":
            body = b""
        if content_type is None:
            content_type = f"multipart/form-data; boundary={boundary}"
        headers = {"Content-Type": content_type} if content_type else {}
        return kind, {"method": method, "path": path, "body": body, "headers": headers}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _dumps(obj) -> str:
    try:
        return json.dumps(obj)
    except (ValueError, RecursionError):  # nesting too deep for the encoder
        return json.dumps({"type": "session.update", "model": None})


def _multipart(fields: dict, files: list, boundary: str) -> bytes:
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + str(value).encode("utf-8", "surrogatepass") + b"\r\n")
    for name, filename, ctype, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        parts.append((head + "\r\n").encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


# -- realtime connections ----------------------------------------------------------------------------

class Connection:
    """One socket with a reader task that keeps every event; ``probe()`` proves the server is answering."""

    def __init__(self, ws, read: bool = True):
        self.ws = ws
        self.events: list[dict] = []
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.arrived = asyncio.Event()
        self.binary = 0
        self.reader = asyncio.create_task(self._read()) if read else None
        self._probes = 0

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.binary += 1
                    continue
                self.events.append(json.loads(message))
                self.arrived.set()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code if self.ws.close_code is not None else 1006
            self.closed.set()
            self.arrived.set()

    async def wait_for(self, predicate, timeout: float, start: int = 0) -> int | None:
        """Index of the first event from ``start`` on that satisfies ``predicate``; None when the
        socket closed first; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for i in range(seen, len(self.events)):
                if predicate(self.events[i]):
                    return i
            seen = len(self.events)
            if self.closed.is_set():
                return None
            self.arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self.arrived.wait()

    async def probe(self, timeout: float) -> tuple[int | None, int]:
        """Send a probe; (index of its answer or None if the socket closed, index where waiting began)."""
        self._probes += 1
        name = f"fuzz.probe.{id(self):x}.{self._probes}"
        start = len(self.events)
        await self.ws.send(json.dumps({"type": name}))
        message = f"Unknown event type: {name}"
        found = await self.wait_for(lambda e: e.get("type") == "error" and e.get("error") == message, timeout, start)
        return found, start

    async def close(self, abrupt: bool = False) -> None:
        if abrupt:
            self.ws.transport.abort()
        else:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)


class Runner:
    def __init__(self, target: Target, fuzz: Fuzz, report: Report, *, cases: int, seconds: float, timeout: float,
                 done_timeout: float, verbose: bool = False):
        self.target = target
        self.fuzz = fuzz
        self.rng = fuzz.rng
        self.report = report
        self.max_cases = cases
        self.deadline = time.monotonic() + seconds
        self.timeout = timeout
        self.done_timeout = done_timeout
        self.verbose = verbose
        self.stop = asyncio.Event()
        self.started = time.monotonic()

    def take(self, n: int = 1) -> bool:
        """Count ``n`` cases if the budget allows."""
        if self.stop.is_set() or self.report.cases >= self.max_cases or time.monotonic() > self.deadline:
            self.stop.set()
            return False
        self.report.cases += n
        return True

    # -- realtime
    async def realtime_worker(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            shape = rng.choices(["lockstep", "burst", "never_read", "abrupt"], [45, 40, 5, 10])[0]
            fuzz = Fuzz(random.Random(rng.random()), self.fuzz.model, self.fuzz.clips, self.fuzz.max_message_bytes)
            try:
                await self.connection(shape, fuzz)
            except Exception as exc:  # the client side failed: report it, go on
                self.report.problem("client_error", shape=shape, error=f"{type(exc).__name__}: {exc}")

    async def connect(self, read: bool = True) -> Connection | None:
        try:
            ws = await connect(self.target.ws_url, open_timeout=self.timeout, close_timeout=2, max_size=None,
                               ping_interval=None, compression=None, max_queue=1 if not read else 64)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            self.report.hangs += isinstance(exc, TimeoutError)
            self.report.problem("connect_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        self.report.connections += 1
        conn = Connection(ws, read=read)
        return conn

    async def connection(self, shape: str, fuzz: Fuzz) -> None:
        if shape == "never_read":
            return await self.never_read(fuzz)
        conn = await self.connect()
        if conn is None:
            return
        report = self.report
        try:
            first = await conn.wait_for(lambda e: True, self.timeout)
            if first is None or conn.events[first].get("type") != "session.created":
                if conn.events and conn.events[0].get("code") == "server_busy":
                    report.refused_connections += 1
                    return
                report.problem("no_session_created", events=conn.events[:3], close=conn.close_code)
                return
            rng = fuzz.rng
            if rng.random() < 0.7:
                await conn.ws.send(json.dumps({"type": "session.update", "model": fuzz.model}))
            audio_left = rng.choice([0.0, 2.0, 5.0, 10.0])
            sent: list[Frame] = []
            for _ in range(rng.randint(3, 40)):
                if not self.take():
                    break
                frame = fuzz.frame(audio_left)
                audio_left -= frame.audio_s
                report.realtime_cases += 1
                report.kinds[frame.kind] += 1
                sent.append(frame)
                try:
                    await conn.ws.send(frame.data)
                except ConnectionClosed:  # the server closed it: answered() says whether it should have
                    break
                if shape == "lockstep":
                    if not await self.answered(conn, sent[-1:]):
                        return
                elif shape == "abrupt" and rng.random() < 0.1:
                    break
            if shape == "abrupt" and not conn.closed.is_set():
                with contextlib.suppress(ConnectionClosed):
                    await conn.ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                    await conn.ws.send(json.dumps({"type": "input_audio_buffer.append",
                                                   "audio": _b64(fuzz.pcm(1.0))}))
                    await conn.close(abrupt=True)
                    return
            if (shape != "lockstep" or conn.closed.is_set()) and not await self.answered(conn, sent):
                return
            if rng.random() < 0.5 and not conn.closed.is_set():
                await self.final(conn, fuzz, sent)
        finally:
            await conn.close()

    async def answered(self, conn: Connection, frames: list[Frame]) -> bool:
        """Probe after ``frames``; checks what came back.  False: stop using this connection."""
        report = self.report
        try:
            found, start = await conn.probe(self.timeout)
        except TimeoutError:
            report.hangs += 1
            report.problem("hang", frames=[f.kind for f in frames][-5:], last=frames[-1].data if frames else None)
            return False
        except ConnectionClosed:
            found, start = None, len(conn.events)
            await conn.closed.wait()
        replies = conn.events[start: found if found is not None else len(conn.events)]
        self.note_events(replies, frames)
        if found is None:  # the server closed the socket: an answer, but was it a right one?
            report.close_codes[conn.close_code] += 1
            idle = any(e.get("code") == "idle_timeout" for e in conn.events)
            if conn.close_code in EXPECTED_CLOSES or (conn.close_code == 1000 and idle):
                report.answered += len(frames)
            else:  # 1011, 1006, or a 1000 no event explains: the session ended on an exception
                report.internal_errors += 1
                report.problem("closed", code=conn.close_code, frames=[f.kind for f in frames][-5:],
                               last=frames[-1].data if frames else None, events=conn.events[-3:])
            return False
        report.answered += len(frames)
        if len(frames) == 1 and frames[0].must_error and not any(e.get("type") == "error" for e in replies):
            report.missing_errors += 1
            report.problem("missing_error", frame=frames[0].kind, data=frames[0].data, replies=replies)
        return True

    def note_events(self, events: list[dict], frames: list[Frame]) -> None:
        for event in events:
            if event.get("type") == "error":
                self.report.event_codes[event.get("code")] += 1
                if "Internal error" in str(event.get("error")):
                    self.report.internal_errors += 1
                    self.report.problem("internal_error", event=event, frames=[f.kind for f in frames][-5:],
                                        last=frames[-1].data if frames else None)

    async def final(self, conn: Connection, fuzz: Fuzz, sent: list[Frame]) -> None:
        """Validated, commit, final: a ``transcription.done`` (or a processing_error in its place) must come."""
        report = self.report
        start = len(conn.events)
        try:
            await conn.ws.send(json.dumps({"type": "session.update", "model": fuzz.model}))
            await conn.ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await conn.ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        except ConnectionClosed:
            return
        report.finals += 1
        try:
            found = await conn.wait_for(lambda e: e.get("type") == "transcription.done"
                                        or (e.get("type") == "error" and e.get("code") == "processing_error"),
                                        self.done_timeout, start)
        except TimeoutError:
            report.hangs += 1
            session = conn.events[0].get("id") if conn.events else None
            report.problem("no_done", waited_s=self.done_timeout, session=session, events=conn.events[-5:],
                           frames=[f.kind if f.kind.startswith(("raw", "bad", "surr", "never")) else f.data[:200]
                                   for f in sent])
            return
        self.note_events(conn.events[start:], [])
        if found is not None and conn.events[found].get("type") == "transcription.done":
            report.finals_done += 1

    async def never_read(self, fuzz: Fuzz) -> None:
        """One case: frames whose error events are large, from a client that does not read.  The
        server must close it (1008) once its outbox is full -- or, if everything fitted in the socket
        buffers, have answered them all (a probe then gets its answer)."""
        if not self.take():
            return
        conn = await self.connect(read=False)
        if conn is None:
            return
        report = self.report
        report.realtime_cases += 1
        report.kinds["never_read"] += 1
        # each error event ~1 kB (an echo is clipped to 1000 characters): 20 MB of them is more than
        # the loopback socket buffers hold, so the server's outbox fills up (OUTBOX_LIMIT) and it closes
        size = fuzz.rng.choice([990, 2_000, 60_000])
        frame = json.dumps({"type": "n" * size})
        count = 500 if size > 10_000 else fuzz.rng.choice([500, 20_000])
        sent = 0
        try:
            for _ in range(count):
                async with asyncio.timeout(self.timeout):
                    await conn.ws.send(frame)
                sent += 1
        except (ConnectionClosed, TimeoutError):  # closed, or no longer read: it must be closing
            pass
        report.never_read_frames += sent
        conn.reader = asyncio.create_task(conn._read())
        try:
            await conn.probe(self.timeout * 3)
            report.answered += 1
        except ConnectionClosed:
            await conn.closed.wait()
        except TimeoutError:
            report.hangs += 1
            report.problem("never_read_hang", sent=sent, size=size, received=len(conn.events))
        if conn.closed.is_set():
            report.close_codes[conn.close_code] += 1
            if conn.close_code == 1008:
                report.slow_reader_closes += 1
                report.answered += 1
            else:
                report.internal_errors += 1
                report.problem("never_read_closed", code=conn.close_code, sent=sent, size=size)
        self.note_events(conn.events, [])
        await conn.close()

    # -- REST
    async def rest_worker(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        while not self.stop.is_set():
            fuzz = Fuzz(random.Random(rng.random()), self.fuzz.model, self.fuzz.clips, self.fuzz.max_message_bytes)
            kind, req = fuzz.rest_case()
            if not self.take():
                return
            self.report.rest_cases += 1
            self.report.kinds["rest:" + kind] += 1
            try:
                status, headers, body = await asyncio.to_thread(self.http, req, self.done_timeout)
            except TimeoutError:
                self.report.hangs += 1
                self.report.problem("rest_hang", kind=kind, path=req["path"])
                continue
            except (OSError, http.client.HTTPException) as exc:
                if not self.target.alive():
                    return
                self.report.problem("rest_failed", kind=kind, error=f"{type(exc).__name__}: {exc}")
                continue
            self.report.answered += 1
            self.report.http_statuses[status] += 1
            if status == 503 and "retry-after" in headers:
                self.report.http_503_busy += 1
            elif status >= 500:
                self.report.http_5xx += 1
                self.report.problem("http_5xx", kind=kind, status=status, body=body)
            elif status >= 400 and kind in ("valid", "valid_stream") and req["path"].endswith("transcriptions"):
                self.report.problem("valid_refused", kind=kind, status=status, body=body)
            if b"Traceback" in body:
                self.report.problem("traceback_in_body", kind=kind, body=body)

    def http(self, req: dict, timeout: float) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(self.target.host, self.target.port, timeout=timeout)
        try:
            conn.putrequest(req["method"], req["path"])
            for key, value in req["headers"].items():
                conn.putheader(key, value)
            conn.putheader("Content-Length", str(len(req["body"])))
            conn.endheaders(req["body"])
            response = conn.getresponse()
            body = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, body
        except TimeoutError:
            raise
        except OSError as exc:
            if "timed out" in str(exc):
                raise TimeoutError from exc
            raise
        finally:
            conn.close()

    # -- the process
    async def monitor(self, interval: float = 0.5) -> None:
        report = self.report
        while not self.stop.is_set():
            rss = self.target.rss_mib()
            if rss is not None:
                report.rss_samples.append([round(time.monotonic() - self.started, 1), round(rss, 1)])
                report.rss_peak_mib = max(report.rss_peak_mib or 0, rss)
            if not self.target.alive():
                report.crashes += 1
                report.problem("crash", log=self.target.proc.log_tail(40) if self.target.proc else None)
                self.stop.set()
                return
            if self.verbose and len(report.rss_samples) % 20 == 0:
                print(f"  {time.monotonic() - self.started:6.1f} s  cases {report.cases}  rss {rss} MiB", flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.stop.wait()


async def _settle(target: Target, timeout: float = 30.0) -> int:
    """Wait until no session is open; returns how many are left."""
    deadline = time.monotonic() + timeout
    while True:
        sessions = (await asyncio.to_thread(read_health, target.http_url))["sessions"]
        if sessions == 0 or time.monotonic() > deadline:
            return sessions
        await asyncio.sleep(0.2)


async def normal_session(target: Target, clips: Clips, max_wer: float) -> dict:
    """One ordinary session on a real clip, and one ordinary REST upload of it: both transcribe it."""
    from harness.evaluation import wer

    ref = clips.refs[CHECK_CLIP]["text"]
    record = await stream_audio(target.ws_url, clips.pcm[CHECK_CLIP], target.model, speed=0, done_timeout=120)
    text = record.done_text or ""
    realtime_wer = wer([ref], [text]) if text else 100.0

    def rest():
        fields = {"model": target.model}
        boundary = "normalsession"
        body = _multipart(fields, [("file", "clip.wav", "audio/wav", clips.wav(CHECK_CLIP))], boundary)
        conn = http.client.HTTPConnection(target.host, target.port, timeout=120)
        try:
            conn.request("POST", "/v1/audio/transcriptions", body,
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    status, body = await asyncio.to_thread(rest)
    rest_text = json.loads(body).get("text", "") if status == 200 else ""
    rest_wer = wer([ref], [rest_text]) if rest_text else 100.0
    ok = (record.ok and record.done_text == record.text and realtime_wer <= max_wer
          and status == 200 and rest_wer <= max_wer)
    return {"ok": ok, "clip": CHECK_CLIP, "reference": ref, "realtime_text": text,
            "realtime_wer": round(realtime_wer, 2), "realtime_errors": record.errors, "closed": record.closed,
            "rest_status": status, "rest_text": rest_text, "rest_wer": round(rest_wer, 2)}


def tracebacks(log: str, offset: int = 0) -> tuple[int, list[str]]:
    text = log[offset:]
    lines = text.splitlines()
    excerpts = []
    for i, line in enumerate(lines):
        if "Traceback" in line and len(excerpts) < 5:
            excerpts.append("\n".join(lines[max(0, i - 2): i + 25]))
    return text.count("Traceback"), excerpts


async def run_fuzz(target: Target, *, cases: int = 2000, seconds: float = 600.0, seed: int = 0,
                   concurrency: int = 4, rest_workers: int = 1, timeout: float = 20.0, done_timeout: float = 90.0,
                   max_wer: float = 20.0, rss_settle_s: float = 5.0, verbose: bool = False) -> Report:
    """Fuzz ``target``, then check it (see the module docstring)."""
    clips = Clips()
    report = Report(seed=seed)
    rng = random.Random(seed)
    before = await asyncio.to_thread(read_health, target.http_url)
    log_offset = len(target.log_text())
    await _settle(target, 10)
    # the same normal session as afterwards, first: what the first decodes allocate is not growth
    report.check_before = await normal_session(target, clips, max_wer)
    await asyncio.sleep(rss_settle_s)
    report.rss_start_mib = target.rss_mib()
    fuzz = Fuzz(rng, target.model, clips)
    runner = Runner(target, fuzz, report, cases=cases, seconds=seconds, timeout=timeout,
                    done_timeout=done_timeout, verbose=verbose)
    started = time.monotonic()
    monitor = asyncio.create_task(runner.monitor())
    workers = [asyncio.create_task(runner.realtime_worker(i)) for i in range(concurrency)]
    workers += [asyncio.create_task(runner.rest_worker(i)) for i in range(rest_workers)]
    await asyncio.gather(*workers)
    runner.stop.set()
    await monitor
    report.seconds = round(time.monotonic() - started, 1)
    if target.alive():
        report.sessions_left = await _settle(target, 30)
        report.check = await normal_session(target, clips, max_wer)
        after = await asyncio.to_thread(read_health, target.http_url)
        report.compilations = compilations(after) - compilations(before)
        await asyncio.sleep(rss_settle_s)
        report.rss_end_mib = target.rss_mib()
        if report.rss_end_mib is not None:
            report.rss_peak_mib = max(report.rss_peak_mib or 0, report.rss_end_mib)
    else:
        report.check = {"ok": False, "reason": "the server is not running"}
    report.tracebacks, report.traceback_excerpts = tracebacks(target.log_text(), log_offset)
    for key in ("rss_start_mib", "rss_peak_mib", "rss_end_mib"):
        if getattr(report, key) is not None:
            setattr(report, key, round(getattr(report, key), 1))
    return report


def summary(report: Report, max_rss_growth: float) -> str:
    growth = report.rss_growth_pct
    lines = [
        f"fuzz: seed {report.seed}, {report.cases} cases ({report.realtime_cases} realtime frames on "
        f"{report.connections} connections, {report.rest_cases} REST requests) in {report.seconds} s",
        f"  answered {report.answered}, crashes {report.crashes}, hangs {report.hangs}, 5xx {report.http_5xx} "
        f"(+{report.http_503_busy} documented 503 busy), internal errors {report.internal_errors}, "
        f"missing errors {report.missing_errors}",
        f"  finals waited {report.finals} (done {report.finals_done}), slow-reader closes (1008) "
        f"{report.slow_reader_closes}, refused at connect {report.refused_connections}",
        f"  error codes {dict(report.event_codes)}",
        f"  close codes {dict(report.close_codes)}  HTTP {dict(sorted(report.http_statuses.items()))}",
        f"  RSS start {report.rss_start_mib} MiB, peak {report.rss_peak_mib} MiB, end {report.rss_end_mib} MiB"
        + (f" ({growth:+.1f} %, bound {max_rss_growth} %)" if growth is not None else ""),
        f"  tracebacks in the server log {report.tracebacks}; compilations {report.compilations}; "
        f"sessions left {report.sessions_left}",
        f"  normal session afterwards: {json.dumps(report.check)}",
    ]
    for problem in report.problems[:10]:
        lines.append(f"  problem: {json.dumps(problem)[:600]}")
    for excerpt in report.traceback_excerpts[:2]:
        lines.append("  traceback:\n" + excerpt)
    lines.append("RESULT: " + ("ok" if report.ok(max_rss_growth) else "FAILED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (loopback only); default: start one on --config")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id (RSS and liveness)")
    ap.add_argument("--server-log", help="with --url: the server's log (tracebacks); else where to write it")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="service config for a started server")
    ap.add_argument("--cases", type=int, default=2000, help="stop after this many cases (frames + requests)")
    ap.add_argument("--seconds", type=float, default=600.0, help="stop after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=4, help="realtime connections at once")
    ap.add_argument("--rest-workers", type=int, default=1, help="REST clients at once")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds a probe, a connect or an answer may take")
    ap.add_argument("--done-timeout", type=float, default=90.0, help="seconds for transcription.done / a REST answer")
    ap.add_argument("--max-wer", type=float, default=20.0, help="the normal session's WER bound, percent")
    ap.add_argument("--max-rss-growth", type=float, default=10.0, help="RSS end over start bound, percent")
    ap.add_argument("--json", help="write the whole report here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    proc = None
    if args.url:
        target = Target(args.url, pid=args.pid, log_path=args.server_log)
    else:
        tmp = tempfile.mkdtemp(prefix="fuzz-realtime-")
        config = write_config(os.path.join(tmp, "fuzz.toml"), base=args.config, admission_control=False)
        proc = ServerProcess.serve(config, name="fuzz", log_path=args.server_log or os.path.join(tmp, "server.log"),
                                   env={"JAX_REALTIME_API_KEY": ""})
        print(f"starting a server on {args.config} (admission_control = false), log {proc.log_path}", flush=True)
        proc.start()
        print(f"server up in {proc.startup_s:.1f} s on {proc.http_url} (pid {proc.proc.pid})", flush=True)
        target = Target.of(proc)
    try:
        report = asyncio.run(run_fuzz(target, cases=args.cases, seconds=args.seconds, seed=args.seed,
                                      concurrency=args.concurrency, rest_workers=args.rest_workers,
                                      timeout=args.timeout, done_timeout=args.done_timeout, max_wer=args.max_wer,
                                      verbose=args.verbose))
    finally:
        if proc is not None:
            proc.stop()
    print(summary(report, args.max_rss_growth))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, **report.as_dict()}, f, indent=1, default=str)
    return 0 if report.ok(args.max_rss_growth) else 1


if __name__ == "__main__":
    sys.exit(main())
