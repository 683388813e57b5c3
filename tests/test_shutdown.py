"""Graceful shutdown and warm restarts of a real server process."""

from __future__ import annotations

import asyncio
import signal

import pytest
from harness.realtime_client import RealtimeClient, ServerProcess, check_done, run, to_pcm16, venv_script

from conftest import TEST_BUCKETS, load_clip, load_refs

pytestmark = pytest.mark.slow


def _config(tmp_path, name="server.toml", buckets=TEST_BUCKETS, cache_dir=None) -> str:
    lines = ["[engine]", f"batch_buckets = {list(buckets['batch_buckets'])}",
             f"window_buckets = {list(buckets['window_buckets'])}",
             f"prompt_buckets = {list(buckets['prompt_buckets'])}"]
    if cache_dir is not None:
        lines.append(f'cache_dir = "{cache_dir}"')
    lines += ["[server]", "drain_timeout_s = 20.0", "admission_control = false"]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _clip(id_prefix: str):
    return to_pcm16(load_clip(next(r for r in load_refs() if r["id"].startswith(id_prefix))))


async def _shutdown_scenario(server: ServerProcess, sig: int) -> dict:
    """A session mid-utterance, a session with uncommitted audio, then ``sig`` to the server."""
    speech = _clip("ljspeech-LJ001-0001")  # 9.7 s
    streaming = await RealtimeClient.connect(server.ws_url)
    await streaming.update(server.model)
    await streaming.commit()
    idle = await RealtimeClient.connect(server.ws_url)
    await idle.update(server.model)
    await idle.append(_clip("hifitts")[:32000])  # 1 s, never committed

    # 4 s of the clip at real-time pace: the utterance is running when the signal arrives
    await streaming.stream(speech[: 4 * 32000], interval=0.1)
    server.proc.send_signal(sig)
    deltas, done = await streaming.until_done(timeout=30)
    text = check_done(deltas, done)
    closed_streaming = await streaming.closed(timeout=30)

    shutdown_error = await idle.expect_error("server_shutdown", timeout=30)
    closed_idle = await idle.closed(timeout=30)
    return {"text": text, "streaming_close": closed_streaming.rcvd, "idle_close": closed_idle.rcvd,
            "idle_error": shutdown_error["error"]}


@pytest.mark.parametrize("how", ["jax-realtime serve", "hypercorn"])
def test_sigterm_lets_a_running_utterance_finish(tmp_path, how):
    config = _config(tmp_path)
    if how == "hypercorn":
        from harness.realtime_client import free_port

        port = free_port()
        server = ServerProcess([venv_script("hypercorn"), "-c", "configs/hypercorn.toml", "--bind",
                                f"127.0.0.1:{port}", "server.app:create_app()"], port, name="hypercorn",
                               env={"JAX_REALTIME_CONFIG": config})
    else:
        server = ServerProcess.serve(config, name="serve")
    with server:
        out = run(_shutdown_scenario(server, signal.SIGTERM), timeout=120)
        assert server.proc.wait(60) == 0, server.log_tail()
    assert out["text"].strip()  # the 4 s streamed before the signal were transcribed
    assert "printing" in out["text"].lower(), out["text"]
    for close in (out["streaming_close"], out["idle_close"]):
        assert close is not None and close.code == 1001, close  # going away
    assert "uncommitted audio was not transcribed" in out["idle_error"]


def test_restart_with_a_warm_cache_compiles_nothing_new(tmp_path):
    cache = tmp_path / "cache"
    buckets = dict(batch_buckets=(1,), window_buckets=(30.0,), prompt_buckets=(8, 232))
    config = _config(tmp_path, buckets=buckets, cache_dir=cache)
    with ServerProcess.serve(config, name="cold") as cold:
        first = cold.startup_health["compile"]
    with ServerProcess.serve(config, name="warm") as warm:
        second = warm.startup_health["compile"]
    assert first["compilations"] >= 1 and first["cache_hits"] == 0  # an empty cache: everything compiled
    assert second["compilations"] == second["cache_hits"] >= 1  # every program came from the cache
    assert (cache / "weights").is_dir() and (cache / "xla").is_dir()
