"""REST limits end to end: nothing a client sends hangs, crashes or bloats the service.

* ``limited``: a ``jax-realtime serve`` child process on real tiny.en weights with the small test
  buckets, ``max_concurrent_requests = 1`` and ``max_audio_s = 120``: audio that decodes to more
  than the cap is refused at once without the memory it would take; requests over the concurrency
  bound get 503 with Retry-After; a prompt over ``MAX_PROMPT_CHARS`` is a 400 naming it.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import flac_silence, webm_silence
from jax_realtime.tokenizer import MAX_PROMPT_CHARS
from realtime_client import ServerProcess
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
    write_config,
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
    tmp = tmp_path_factory.mktemp("limits")
    config = write_config(tmp / "limits.toml", max_concurrent_requests=1, max_audio_s=MAX_AUDIO_S)
    proc = ServerProcess.serve(config, name="limits", log_path=tmp / "limits.log", startup_timeout=STARTUP_TIMEOUT,
                               env={"JAX_REALTIME_API_KEY": ""})
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def server(limited):
    yield limited
    assert limited.alive(), limited.log_tail()


def test_audio_longer_than_the_cap_is_refused_without_decoding_it(server):
    """2 h of FLAC silence is 180 kB on the wire and 460 MB as 16 kHz float32: refused at once from
    its header, the server's peak memory unchanged.  A MediaRecorder-style WebM (no duration in
    its header) of 5 minutes is decoded only up to the cap, then refused the same way."""
    flac = flac_silence(2 * 3600)
    assert len(flac) < 1024 * 1024
    message = f"The audio is longer than this server's limit of {MAX_AUDIO_S} s (2 min): send a shorter file, or split it."
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
                                 re.compile(r"The server is busy: 1 transcription requests are in progress "
                                            r"\(this server's limit is 1\)\. Retry later\."))
            assert headers["retry-after"] == "1", error
        else:
            assert len(json.loads(body)["text"]) > 200
    after = scrape(server)
    assert metric(after, "jax_realtime_http_requests_total", endpoint="transcriptions", status="503") - \
        metric(before, "jax_realtime_http_requests_total", endpoint="transcriptions", status="503") == 3

    # a streamed answer holds the slot until its end, then frees it
    status, _, body = post_form(server, {"model": "tiny.en", "stream": "true"}, {"file": ("c.wav", wav(SHORT))})
    assert status == 200 and body.decode().endswith("data: [DONE]\n\n"), body
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
