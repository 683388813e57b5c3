"""REST limits and faults end to end: nothing a client sends, and no engine failure, hangs, crashes
or bloats the service.

Two services, both on real tiny.en weights with the small test buckets:

* ``limited``: a ``jax-realtime serve`` child process with ``max_concurrent_requests = 1`` and
  ``max_audio_s = 120``, watched from the moment it is launched: ``/health`` says 503 "starting"
  while the engine warms (and ``/v1/`` answers 503), then 200; audio that decodes to more than the
  cap is refused at once without the memory it would take; requests over the concurrency bound get
  503 with Retry-After; a prompt over ``MAX_PROMPT_CHARS`` is a 400 naming it.
* ``in_process``: the app itself (``create_app``) under Quart's test client with ``max_pending = 1``:
  the engine's queue full answers 503 with Retry-After, and an engine failure answers 500 (the
  service then goes on serving).  No input a REST client can send makes the real engine fail (the
  route validates language, task, temperature and audio before anything reaches it), so the
  failure is injected where a real one would surface -- ``engine.decode`` raising once, as a device
  error would -- and everything else (batcher, routes, the next request's transcription) is real.

pytest has no asyncio plugin here: async parts run on a loop of their own.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import TEST_BUCKETS, flac_silence, webm_silence
from harness.service_config import write_config
from jax_realtime.tokenizer import MAX_PROMPT_CHARS
from harness.realtime_client import ServerProcess, run
from test_rest import (
    SHORT,
    STARTUP_TIMEOUT,
    TINY,
    assert_error,
    long_wav,
    metric,
    multipart,
    post_form,
    request,
    scrape,
    wav,
)

pytestmark = pytest.mark.slow

MAX_AUDIO_S = 120


def _rss_peak_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


# ------------------------------------------------------------------------- the limited server


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """Launched, then watched while it warms: the first answers of /health, /v1/models, the
    WebSocket handshake and /metrics are kept in ``proc.while_starting``."""
    tmp = tmp_path_factory.mktemp("limits")
    config = write_config(tmp / "limits.toml", admission_control=False, max_concurrent_requests=1,
                          max_audio_s=MAX_AUDIO_S)
    proc = ServerProcess.serve(config, name="limits", log_path=tmp / "limits.log", startup_timeout=STARTUP_TIMEOUT,
                               env={"JAX_REALTIME_API_KEY": ""})
    proc.launch()
    seen = {}
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and proc.alive():
        try:
            seen["health"] = request(proc, "GET", "/health", timeout=5)
            break
        except OSError:  # not listening yet
            time.sleep(0.02)
    if seen.get("health", (0,))[0] == 503:  # warming: what else answers now
        seen["models"] = request(proc, "GET", "/v1/models", timeout=5)
        seen["metrics"] = request(proc, "GET", "/metrics", timeout=5)

        async def handshake():
            with pytest.raises(InvalidStatus) as info:
                async with connect(proc.ws_url, open_timeout=10):
                    pass
            return info.value.response

        seen["websocket"] = run(handshake(), timeout=30)
        seen["health_after"] = request(proc, "GET", "/health", timeout=5)  # still warming by then?
    proc.while_starting = seen
    proc.wait_ready(poll_s=0.02)
    yield proc
    proc.stop()


@pytest.fixture
def server(limited):
    yield limited
    assert limited.alive(), limited.log_tail()


def test_health_says_starting_until_the_engine_is_warm(server):
    """Hypercorn listens before the engine is warm: /health answers 503 "starting" (load balancers
    keep traffic away), /v1/ routes and the WebSocket handshake 503 with Retry-After, /metrics
    works; then /health answers 200, and ServerProcess waited for exactly that."""
    seen = server.while_starting
    status, headers, body = seen["health"]
    assert (status, json.loads(body)) == (503, {"status": "starting"}), seen
    error = assert_error(*seen["models"], 503, "ServiceUnavailableError", None,
                         "The server is starting: the model is loading and compiling. Retry later.")
    assert seen["models"][1]["retry-after"] == "5", error
    assert seen["websocket"].status_code == 503
    assert json.loads(bytes(seen["websocket"].body))["error"]["type"] == "ServiceUnavailableError"
    assert seen["metrics"][0] == 200
    assert seen["health_after"][0] == 503, "warm-up ended while the checks ran: they proved nothing"
    statuses = server.startup_statuses
    assert statuses[-1] == (200, "ok") and (503, "starting") in statuses[:-1], statuses
    assert server.health()["status"] == "ok"
    assert request(server, "GET", "/v1/models")[0] == 200


def test_audio_longer_than_the_cap_is_refused_without_decoding_it(server):
    """2 h of FLAC silence is 180 kB on the wire and 460 MB as 16 kHz float32: refused at once from
    its header, the server's peak memory unchanged.  A MediaRecorder-style WebM (no duration in
    its header) of 5 minutes is decoded only up to the cap, then refused the same way."""
    flac = flac_silence(2 * 3600)
    assert len(flac) < 1024 * 1024
    message = (f"The audio is longer than this server's limit of {MAX_AUDIO_S} s (2 min): send a shorter file, "
               "or split it.")
    peak_before = _rss_peak_kib(server.proc.pid)
    started = time.monotonic()
    got = post_form(server, {"model": "tiny.en"}, {"file": ("silence.flac", flac)})
    elapsed = time.monotonic() - started
    assert_error(*got, 400, "BadRequestError", "file", message)
    assert elapsed < 5.0, elapsed
    grown_mib = (_rss_peak_kib(server.proc.pid) - peak_before) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"

    webm = webm_silence(300)
    assert_error(*post_form(server, {"model": "tiny.en"}, {"file": ("recording.webm", webm)}), 400,
                 "BadRequestError", "file", message)
    grown_mib = (_rss_peak_kib(server.proc.pid) - peak_before) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    # under the cap: transcribed
    status, _, body = post_form(server, {"model": "tiny.en"}, {"file": ("clip.wav", wav(TINY))})
    assert status == 200 and json.loads(body)["text"], body


def test_requests_over_the_concurrency_bound_get_503(server):
    """max_concurrent_requests = 1: four uploads at once (one ~60 s file takes seconds here) ->
    one is transcribed, three are refused with 503 and Retry-After at once; the slot is free again
    afterwards, after a streamed answer too, and after a client that walks away mid-stream."""
    data, _ = long_wav()
    assert len(data) / 32000 < MAX_AUDIO_S
    before = scrape(server)
    barrier = threading.Barrier(4)

    def upload(_):
        barrier.wait()
        return post_form(server, {"model": "tiny.en"}, {"file": ("long.wav", data)})

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(upload, range(4)))
    assert sorted(status for status, _, _ in results) == [200, 503, 503, 503], [r[:1] + r[2:][:1] for r in results]
    for status, headers, body in results:
        if status == 503:
            error = assert_error(status, headers, body, 503, "ServiceUnavailableError", None,
                                 "The server is busy: it is at its limit of 1 transcription requests in "
                                 "progress at once. Retry later.")
            assert headers["retry-after"] == "1", error
        else:
            assert len(json.loads(body)["text"]) > 200
    after = scrape(server)
    assert metric(after, "jax_realtime_http_requests_total", endpoint="transcriptions", status="503") - \
        metric(before, "jax_realtime_http_requests_total", endpoint="transcriptions", status="503") == 3

    # a streamed answer holds the slot until its end, then frees it
    status, _, body = post_form(server, {"model": "tiny.en", "stream": "true"}, {"file": ("c.wav", wav(SHORT))})
    assert status == 200 and '"type": "transcript.text.done"' in body.decode().split("\n\n")[-2], body
    assert post_form(server, {"model": "tiny.en"}, {"file": ("c.wav", wav(TINY))})[0] == 200

    # a client that leaves mid-stream frees it too (once the server notices)
    body, content_type = multipart({"model": "tiny.en", "stream": "true"}, {"file": ("long.wav", data)})
    conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
    conn.request("POST", "/v1/audio/transcriptions", body, {"Content-Type": content_type})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "  # the first window's chunk
    conn.close()
    deadline = time.monotonic() + 60
    while True:
        status = post_form(server, {"model": "tiny.en"}, {"file": ("c.wav", wav(TINY))})[0]
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200, "the slot of the abandoned stream was never released"


def test_prompt_over_the_cap_is_a_400_naming_it(server):
    """MAX_PROMPT_CHARS (4096): one more character is a 400 naming ``prompt``; a field of a
    megabyte is refused by the form parser with its own message; exactly the cap is accepted."""
    text = "Roman character, Italy, Germany and France. "
    at_cap = (text * (MAX_PROMPT_CHARS // len(text) + 1))[:MAX_PROMPT_CHARS]
    assert_error(*post_form(server, {"model": "tiny.en", "prompt": at_cap + "x"}, {"file": ("c.wav", wav(TINY))}),
                 400, "BadRequestError", "prompt",
                 f"prompt: {MAX_PROMPT_CHARS + 1} characters is over this server's limit of {MAX_PROMPT_CHARS} "
                 "(Whisper uses only the last 223 tokens of a prompt).")
    assert_error(*post_form(server, {"model": "tiny.en", "prompt": "x" * (1 << 20)}, {"file": ("c.wav", wav(TINY))}),
                 400, "BadRequestError", None,
                 f"A form field is over this server's limit of 64 KiB (a prompt may hold at most {MAX_PROMPT_CHARS} "
                 "characters).")
    status, _, body = post_form(server, {"model": "tiny.en", "prompt": at_cap}, {"file": ("c.wav", wav(TINY))})
    assert status == 200 and json.loads(body)["text"], body


# ----------------------------------------------------------------------------- the app in process


class InProcess:
    """``create_app(config)`` started (Quart's lifespan) on an event loop of its own thread."""

    def __init__(self, config):
        from server.app import create_app

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process-app", daemon=True)
        self.thread.start()
        self.app = create_app(config)

        async def start():
            test_app = self.app.test_app()
            await test_app.startup()
            return test_app

        self.test_app = self.run(start())
        self.client = self.app.test_client()

    def run(self, coro, timeout: float = STARTUP_TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_ready(self) -> None:
        async def ready():
            while (response := await self.client.get("/health")).status_code != 200:
                assert (await response.get_json())["status"] == "starting"
                await asyncio.sleep(0.1)

        self.run(ready())

    @property
    def service(self):
        from server.service import service_of

        return service_of(self.app)

    def close(self) -> None:
        self.run(self.test_app.shutdown(), timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def in_process():
    from jax_realtime.config import ServiceConfig

    config = ServiceConfig.model_validate({"engine": {"model": "tiny.en", **TEST_BUCKETS},
                                           "server": {"max_pending": 1, "max_concurrent_requests": 8}})
    proc = InProcess(config)
    proc.wait_ready()
    yield proc
    proc.close()


async def _post(client, data: bytes, **fields):
    from werkzeug.datastructures import FileStorage

    response = await client.post("/v1/audio/transcriptions", form={"model": "tiny.en", **fields},
                                 files={"file": FileStorage(io.BytesIO(data), filename="clip.wav")})
    return response.status_code, dict(response.headers), await response.get_data()


def _error(status: int, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
    return status, {k.lower(): v for k, v in headers.items()}, body


def test_engine_queue_full_is_a_503_with_retry_after(in_process):
    """max_pending = 1: eight requests at once, while the engine decodes one window the next waits
    and the rest are refused with 503 and Retry-After (never a hang or a 500); then one more is
    transcribed."""
    assert in_process.service.batcher.max_pending == 1

    async def burst():
        return await asyncio.gather(*(_post(in_process.client, wav(SHORT)) for _ in range(8)))

    results = in_process.run(burst())
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) == {200, 503} and statuses.count(503) >= 2, statuses
    for status, headers, body in results:
        if status == 503:
            error = assert_error(*_error(status, headers, body), 503, "ServiceUnavailableError", None,
                                 "The server is busy: too many requests are waiting for the engine. Retry later.")
            assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "1", error
        else:
            assert json.loads(body)["text"].strip()
    status, _, body = in_process.run(_post(in_process.client, wav(TINY)))
    assert status == 200 and json.loads(body)["text"].strip()
    assert in_process.service.batcher.queue_depth == 0 and in_process.service.rest_active == 0


def test_an_engine_failure_is_a_500_and_the_service_goes_on(in_process, monkeypatch):
    """The engine raises on one batch (as a device error would): that request gets a 500 naming
    the failure (streamed: an error event, then [DONE] in vLLM's shape, the end of the stream in
    OpenAI's); the batcher keeps running and the next
    request is transcribed by the real engine."""
    engine = in_process.service.engine
    real_decode = engine.decode
    failures = []

    @functools.wraps(real_decode)
    def fail_once(requests):
        if not failures:
            failures.append(len(requests))
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while running the batch")
        return real_decode(requests)

    monkeypatch.setattr(engine, "decode", fail_once)
    got = in_process.run(_post(in_process.client, wav(SHORT)))
    assert_error(*_error(*got), 500, "InternalServerError", None,
                 "The engine failed: RESOURCE_EXHAUSTED: out of memory while running the batch")
    status, _, body = in_process.run(_post(in_process.client, wav(SHORT)))
    assert status == 200 and json.loads(body)["text"].strip()

    failures.clear()
    status, _, body = in_process.run(_post(in_process.client, wav(SHORT), stream="true", stream_format="vllm"))
    events = body.decode().split("\n\n")
    assert status == 200 and events[-2:] == ["data: [DONE]", ""], events
    assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == 500, events
    failures.clear()
    status, _, body = in_process.run(_post(in_process.client, wav(SHORT), stream="true"))  # OpenAI's shape
    events = body.decode().split("\n\n")
    assert status == 200 and events[-1] == "", events
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == 500, events
    status, _, body = in_process.run(_post(in_process.client, wav(SHORT)))
    assert status == 200 and json.loads(body)["text"].strip()
    assert in_process.service.rest_active == 0 and in_process.service.requests_in_flight == 0
