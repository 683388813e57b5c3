"""The protocol fuzzer (``scripts/fuzz_realtime.py``), CI-sized: a few hundred seeded cases against
a real server process, which must neither crash, hang, answer 5xx nor log a traceback, and must
still transcribe a normal session correctly afterwards.

One ``jax-realtime serve`` child process on real tiny.en weights with the small test buckets and
``admission_control = false`` (a fixed ``max_sessions``: the shared CPU's measured load is not
what is tested).  The cases: random and mutated vLLM realtime events, OpenAI-protocol events,
text that is not JSON, binary frames, bad base64 and audio, clients that never read, connections
dropped mid-utterance, and malformed multipart uploads to both REST audio routes (see the script's
docstring).  The only 5xx allowed is the documented 503 with ``Retry-After`` (the REST
concurrency bound); every close the server makes must be one the protocol documents (1008 for a
client that does not read, 1013 busy).  A failure prints the fuzzer's summary: the problems with
the frames that caused them, and the server log's tracebacks.
"""

from __future__ import annotations

import pytest

from fuzz_realtime import Target, run_fuzz, summary
from harness.realtime_client import ServerProcess, run
from harness.service_config import write_config

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 900.0
SEED = 20261203
CASES = 400
SECONDS = 45.0  # the bound if the machine is slow: fewer cases, never a longer test
MAX_RSS_GROWTH_MIB = 150.0  # RSS after the fuzzing over RSS before it (after a first normal session)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    proc = ServerProcess.serve(write_config(tmp / "fuzz.toml", admission_control=False), name="fuzz", log_path=tmp / "fuzz.log",
                               startup_timeout=STARTUP_TIMEOUT, env={"JAX_REALTIME_API_KEY": ""})
    proc.start()
    yield proc
    proc.stop()


def test_fuzzing_leaves_the_server_serving(fuzz_server):
    report = run(run_fuzz(Target.of(fuzz_server), cases=CASES, seconds=SECONDS, seed=SEED, concurrency=3,
                          rest_workers=1, timeout=20.0, done_timeout=60.0, max_wer=20.0), timeout=400)
    text = summary(report, max_rss_growth=100.0)
    print(text)
    assert report.cases >= 100, text  # it did fuzz (45 s hold at least this many on a slow machine)
    assert report.realtime_cases > 0 and report.rest_cases > 0, text
    assert report.crashes == 0 and fuzz_server.alive(), text
    assert report.hangs == 0, text
    assert report.http_5xx == 0, text  # 503 with Retry-After is counted apart (documented)
    assert report.internal_errors == 0, text  # no "Internal error" event, no close 1011 / unexplained close
    assert report.missing_errors == 0, text  # every frame that must be refused got an error event
    assert report.tracebacks == 0, text
    assert report.sessions_left == 0, text
    assert report.compilations == 0, text
    assert report.check_before["ok"] and report.check["ok"], text  # a normal session, before and after
    assert report.rss_end_mib - report.rss_start_mib <= MAX_RSS_GROWTH_MIB, text
