"""End to end: a real server process on a free local port, spoken to over ``/v1/realtime``.

No mocks. Three servers, each a child process on real tiny.en weights with the small test buckets
(the default cache directory, so compiled programs are reused across runs):

* ``server``: ``jax-realtime serve --config <toml> --port <free>``, default limits, word
  timestamps compiled (``[engine] word_timestamps = true``: sessions opt in); most tests.
* ``tight``: the same command with max_sessions 2, idle_timeout_s 3, max_buffer_s 3,
  max_message_bytes 32000 (1 s of audio): capacity, idle timeout, buffer and size limits.
* Hypercorn on ``server.app:create_app()`` with ``$JAX_REALTIME_CONFIG`` (one smoke test that owns
  its server and checks that it shuts down cleanly).

The spec is ``/work/shared/docs/realtime-protocol.md``; vLLM's four end-to-end scenarios come first.
The last test checks that nothing was compiled after warm-up in any server this module started.

pytest has no asyncio plugin here: each test is a sync function running one coroutine with
:func:`harness.realtime_client.run`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, check_stream_words, load_clip, load_refs
from harness.service_config import write_config
from harness.evaluation import normalize, wer
from harness.realtime_client import (
    BYTES_PER_SECOND,
    RealtimeClient,
    ServerProcess,
    b64,
    check_done,
    chunk_pcm,
    free_port,
    run,
    to_pcm16,
    venv_script,
)

pytestmark = pytest.mark.slow

MODEL_NOT_VALIDATED = "Model not validated. Make sure to validate the model by sending a session.update event."
STARTUP_TIMEOUT = 900.0  # a cold compilation cache on 2 shared cores takes minutes

# Every server this module started, for the final no-compilation check.
_STARTED: list[ServerProcess] = []

# --------------------------------------------------------------------------------------- clips

_REFS = {r["id"]: r for r in load_refs() if r["language"] == "en"}
LONG = "ljspeech-LJ001-0001"  # 9.7 s
MEDIUM = "ljspeech-LJ001-0030"  # 6.9 s
SHORT = "ljspeech-LJ001-0016"  # 5.3 s
EIGHT = [  # 8 different clips for the concurrency test
    "ljspeech-LJ001-0001", "ljspeech-LJ001-0016", "ljspeech-LJ001-0030", "ljspeech-LJ050-0131",
    "ljspeech-LJ001-0023", "ljspeech-LJ001-0008", "hifitts-6097-astralplane_04_leadbeater_0040",
    "hifitts-6097-presentpictureofnsw_02_mann_0083",
]


@functools.cache
def audio(clip_id: str) -> bytes:
    """The clip as PCM16 LE bytes, 16 kHz mono."""
    return to_pcm16(load_clip(_REFS[clip_id]))


def ref_text(clip_id: str) -> str:
    return _REFS[clip_id]["text"]


def assert_transcribes(clip_ids: list[str], texts: list[str], bound: float) -> float:
    """Corpus WER (Whisper's normaliser) of ``texts`` against the clips' references is <= bound %."""
    assert all(t.strip() for t in texts), texts
    score = wer([ref_text(c) for c in clip_ids], texts)
    assert score <= bound, f"WER {score:.1f}% > {bound}%: " + json.dumps(
        [{"ref": ref_text(c), "hyp": t} for c, t in zip(clip_ids, texts)], indent=1)
    return score


# ------------------------------------------------------------------------------------- servers


def start_serve(tmp: Path, name: str, engine: dict | None = None, **server) -> ServerProcess:
    # admission by measured load is off unless a test turns it on: these servers share two cores
    # with the test process, and what they test is a fixed max_sessions
    config = write_config(tmp / f"{name}.toml", engine=engine, **{"admission_control": False, **server})
    proc = ServerProcess.serve(config, name=name, log_path=tmp / f"{name}.log", startup_timeout=STARTUP_TIMEOUT)
    proc.start()
    _STARTED.append(proc)
    return proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = start_serve(tmp_path_factory.mktemp("serve"), "serve", engine={"word_timestamps": True})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    proc = start_serve(tmp_path_factory.mktemp("tight"), "tight", max_sessions=2, idle_timeout_s=3.0,
                       max_buffer_s=3.0, max_message_bytes=32000)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """Admission by measured load, with a capacity deliberately made tiny (one session)."""
    proc = start_serve(tmp_path_factory.mktemp("crowded"), "crowded", admission_control=True, target_load=0.001)
    yield proc
    proc.stop()


@pytest.fixture
def check_server(server):
    """The shared server, checked before and after a test: alive, no session left behind."""
    run(server.wait_sessions(0))
    yield server
    assert server.alive(), server.log_tail()
    run(server.wait_sessions(0))


@pytest.fixture
def check_tight(tight):
    run(tight.wait_sessions(0))
    yield tight
    assert tight.alive(), tight.log_tail()
    run(tight.wait_sessions(0))


async def session(proc: ServerProcess, model: str = "tiny.en", **fields) -> RealtimeClient:
    """A connected client whose model is validated."""
    client = await RealtimeClient.connect(proc.ws_url)
    await client.update(model, **fields)
    return client


async def still_usable(client: RealtimeClient) -> None:
    """The socket is open and events are still processed: a session.update is answered."""
    updated = await client.update("tiny.en")
    assert updated["model"] == "tiny.en"


# ===================================================================== vLLM's four scenarios


def test_multi_chunk_streaming_two_utterances_on_one_socket(check_server):
    """vLLM scenario 1: 100 ms appends, two utterances in sequence on one socket; each ``done``
    is the concatenation of its deltas and matches the clip."""

    async def main():
        async with await session(check_server) as c:
            texts = []
            for clip in (MEDIUM, LONG):
                deltas, done = await c.transcribe(audio(clip), chunk_s=0.1)
                texts.append(check_done(deltas, done))
                assert done["usage"]["completion_tokens"] > 0, done
            assert_transcribes([MEDIUM, LONG], texts, bound=25.0)

    run(main())


def test_empty_commit_gives_empty_done_and_next_connection_works(check_server):
    """vLLM scenario 2: commit then final with no audio -> done with empty text; the engine is
    not broken (the same socket and a second connection still transcribe)."""

    async def main():
        async with await session(check_server) as c:
            await c.commit()
            await c.commit(final=True)
            deltas, done = await c.until_done(30)
            assert check_done(deltas, done) == ""
            assert done["usage"]["completion_tokens"] == 0
            # the same socket goes on
            deltas, done = await c.transcribe(audio(SHORT))
            assert_transcribes([SHORT], [check_done(deltas, done)], bound=30.0)
        async with await session(check_server) as c2:
            deltas, done = await c2.transcribe(audio(MEDIUM))
            assert_transcribes([MEDIUM], [check_done(deltas, done)], bound=30.0)

    run(main())


@pytest.mark.parametrize("model", ["whisper-large-v3", "tiny", "openai/whisper-tiny", ""])
def test_unknown_model_is_model_not_found(check_server, model):
    """vLLM scenario 3: an invalid model -> ``error`` naming it; the socket stays open."""

    async def main():
        async with await RealtimeClient.connect(check_server.ws_url) as c:
            await c.send("session.update", model=model)
            await c.expect_error("model_not_found", f"The model `{model}` does not exist.")
            await c.commit()  # still not validated
            await c.expect_error("model_not_validated", MODEL_NOT_VALIDATED)
            await still_usable(c)

    run(main())


def test_commit_before_session_update_is_model_not_validated(check_server):
    """vLLM scenario 4, plus: the check comes before field validation (a malformed commit while
    unvalidated is still model_not_validated), and the session recovers after the update."""

    async def main():
        async with await RealtimeClient.connect(check_server.ws_url) as c:
            await c.commit()
            await c.expect_error("model_not_validated", MODEL_NOT_VALIDATED)
            await c.commit(final=True)
            await c.expect_error("model_not_validated", MODEL_NOT_VALIDATED)
            await c.send("input_audio_buffer.commit", final="maybe")
            await c.expect_error("model_not_validated", MODEL_NOT_VALIDATED)
            await c.update()
            deltas, done = await c.transcribe(audio(SHORT))
            assert_transcribes([SHORT], [check_done(deltas, done)], bound=30.0)

    run(main())


# ============================================================================ every error code

# (frame, code, exact message or None, where a message is checked by prefix instead)
ERROR_FRAMES = [
    pytest.param("not json", "invalid_json", "Invalid JSON", id="invalid_json"),
    pytest.param("{", "invalid_json", "Invalid JSON", id="invalid_json-truncated"),
    pytest.param("", "invalid_json", "Invalid JSON", id="invalid_json-empty"),
    pytest.param('{"type": "foo.bar"}', "unknown_event", "Unknown event type: foo.bar", id="unknown_event"),
    pytest.param('{"type": "response.create"}', "unknown_event", "Unknown event type: response.create",
                 id="unknown_event-openai"),
    pytest.param('{"model": "tiny.en"}', "unknown_event", "Unknown event type: None", id="unknown_event-missing"),
    pytest.param('{"type": null}', "unknown_event", "Unknown event type: None", id="unknown_event-null"),
    pytest.param('{"type": "session.update"}', "invalid_event", "Missing required field: model",
                 id="invalid_event"),
    pytest.param('{"type": "session.update", "model": null}', "invalid_event", "Missing required field: model",
                 id="invalid_event-null"),
    pytest.param('{"type": "input_audio_buffer.append", "audio": "not base64!"}', "invalid_audio",
                 "Invalid audio data", id="invalid_audio-base64"),
    pytest.param('{"type": "input_audio_buffer.append", "audio": "' + b64(b"\x01\x02\x03") + '"}',
                 "invalid_audio", "Invalid audio data", id="invalid_audio-odd"),
    pytest.param('{"type": "input_audio_buffer.append", "audio": ""}', "invalid_audio", "Invalid audio data",
                 id="invalid_audio-empty"),
    pytest.param('{"type": "input_audio_buffer.append", "audio": 123}', "processing_error",
                 "Invalid input_audio_buffer.append event: audio", id="processing_error-type"),
    pytest.param('{"type": "input_audio_buffer.append"}', "processing_error",
                 "Invalid input_audio_buffer.append event: audio", id="processing_error-missing"),
    pytest.param('{"type": "session.update", "model": 5}', "processing_error",
                 "Invalid session.update event: model", id="processing_error-model-type"),
    pytest.param('[1, 2]', "processing_error", "'list' object has no attribute 'get'",
                 id="processing_error-array"),
    pytest.param('"hello"', "processing_error", "'str' object has no attribute 'get'",
                 id="processing_error-string"),
    pytest.param(b"\x00\x01binary", "invalid_frame", None, id="invalid_frame"),
]


@pytest.mark.parametrize("validated", [False, True], ids=["unvalidated", "validated"])
@pytest.mark.parametrize("frame, code, message", ERROR_FRAMES)
def test_error_code(check_server, frame, code, message, validated):
    """Each bad frame gives exactly one ``error`` with the spec's code and message, and the socket
    stays open (the next event is processed normally)."""

    async def main():
        async with await RealtimeClient.connect(check_server.ws_url) as c:
            if validated:
                await c.update()
            await c.send_raw(frame)
            event = await c.expect("error")
            assert set(event) == {"type", "error", "code"} and isinstance(event["error"], str), event
            assert event["code"] == code, event
            if message is not None:
                assert event["error"] == message or event["error"].startswith(message + ":"), event
            await still_usable(c)

    run(main())


def test_processing_error_for_bad_commit_and_bad_language(check_server):
    """A validated session: a commit whose ``final`` is not a bool and a session.update with a
    language the model does not speak are processing_errors; neither changes the session."""

    async def main():
        async with await session(check_server) as c:
            await c.send("input_audio_buffer.commit", final="maybe")
            err = await c.expect_error("processing_error")
            assert err["error"].startswith("Invalid input_audio_buffer.commit event: final"), err
            await c.send("session.update", model="tiny.en", language="xx")
            await c.expect_error("processing_error")
            await c.send("session.update", model="tiny.en", prompt="word " * 1000)  # 5000 characters
            err = await c.expect_error("processing_error")
            assert err["error"] == "prompt: at most 4096 characters, not 5000", err
            # extra keys (event_id) are accepted; the session is still validated
            await c.send("input_audio_buffer.commit", event_id="evt_1")
            await c.stream(audio(SHORT))
            await c.send("input_audio_buffer.commit", final=True, event_id="evt_2")
            deltas, done = await c.until_done()
            assert_transcribes([SHORT], [check_done(deltas, done)], bound=30.0)

    run(main())


def test_errors_during_an_utterance_do_not_disturb_it(check_server):
    """Bad frames of every kind interleaved with a streaming utterance: each gets its error, the
    socket stays open, and the utterance completes with the right text."""
    bad = ["not json", b"\x00\x01", '{"type": "nope"}', '{}', '{"type": "session.update"}',
           '{"type": "session.update", "model": "nope"}', '{"type": "input_audio_buffer.append", "audio": "!!"}',
           '{"type": "input_audio_buffer.append", "audio": 1}', "[]"]
    expected = ["invalid_json", "invalid_frame", "unknown_event", "unknown_event", "invalid_event",
                "model_not_found", "invalid_audio", "processing_error", "processing_error"]

    async def main():
        async with await session(check_server) as c:
            await c.commit()
            pieces = chunk_pcm(audio(MEDIUM), 0.1)
            step = len(pieces) // (len(bad) + 1)
            for i, piece in enumerate(pieces):
                await c.append(piece)
                if i % step == step - 1 and i // step < len(bad):
                    await c.send_raw(bad[i // step])
                await asyncio.sleep(0)
            await c.commit(final=True)
            deltas, codes = [], []
            while True:
                event = await c.recv(60)
                if event["type"] == "error":
                    codes.append(event["code"])
                elif event["type"] == "transcription.delta":
                    deltas.append(event["delta"])
                else:
                    assert event["type"] == "transcription.done", event
                    break
            assert codes == expected
            assert_transcribes([MEDIUM], [check_done(deltas, event)], bound=25.0)

    run(main())


# ============================================================================= lifecycle rules


def test_session_created_and_updated_fields(check_server):
    async def main():
        before = int(time.time())
        async with await RealtimeClient.connect(check_server.ws_url) as c:
            created = c.created
            assert list(created) == ["type", "id", "created"], created
            assert re.fullmatch(r"sess-[0-9a-f]{16}", created["id"]), created
            assert isinstance(created["created"], int) and before - 1 <= created["created"] <= time.time() + 1
            await c.send("session.update", model="tiny.en")
            raw = await asyncio.wait_for(c.ws.recv(), 30)
            # nulls are sent, not omitted; type first
            assert raw.startswith('{"type":"session.updated"'), raw
            assert json.loads(raw) == {"type": "session.updated", "model": "tiny.en", "language": None,
                                       "prompt": None, "task": "transcribe", "partials": False,
                                       "word_timestamps": False}
            assert '"language":null' in raw.replace(" ", "") and '"prompt":null' in raw.replace(" ", "")
            for alias in ("whisper-tiny.en", "openai/whisper-tiny.en"):
                updated = await c.update(alias, language="en", prompt="Printing.", task="transcribe")
                assert updated == {"type": "session.updated", "model": alias, "language": "en",
                                   "prompt": "Printing.", "task": "transcribe", "partials": False,
                                   "word_timestamps": False}
        async with await RealtimeClient.connect(check_server.ws_url) as other:
            assert other.created["id"] != created["id"]

    run(main())


def test_invalid_update_does_not_undo_earlier_success(check_server):
    async def main():
        async with await session(check_server) as c:
            await c.send("session.update", model="not-a-model")
            await c.expect_error("model_not_found", "The model `not-a-model` does not exist.")
            await c.send("session.update")
            await c.expect_error("invalid_event", "Missing required field: model")
            deltas, done = await c.transcribe(audio(SHORT))  # no model_not_validated
            assert_transcribes([SHORT], [check_done(deltas, done)], bound=30.0)

    run(main())


def test_audio_appended_before_commit_belongs_to_the_utterance(check_server):
    """Audio sent before session.update and before the commit is consumed from the start of the
    next utterance; after ``done``, audio queued before the next commit belongs to that one."""

    async def main():
        async with await RealtimeClient.connect(check_server.ws_url) as c:
            pcm = audio(MEDIUM)
            head, tail = pcm[: 3 * BYTES_PER_SECOND], pcm[3 * BYTES_PER_SECOND:]
            await c.stream(head)  # before session.update
            await c.update()
            await c.stream(tail)  # validated, still before the commit
            await c.commit()
            await c.commit(final=True)
            deltas, done = await c.until_done()
            first = check_done(deltas, done)
            # the next utterance: all its audio queued while idle, commit last
            await c.stream(audio(SHORT))
            await c.commit()
            await c.commit(final=True)
            deltas, done = await c.until_done()
            assert_transcribes([MEDIUM, SHORT], [first, check_done(deltas, done)], bound=25.0)

    run(main())


def test_clear_drops_queued_audio(check_server):
    async def main():
        async with await session(check_server) as c:
            await c.append(audio(LONG))  # to be dropped
            await c.send("input_audio_buffer.clear")
            await c.commit()
            await c.commit(final=True)
            deltas, done = await c.until_done(60)
            assert check_done(deltas, done) == ""  # the cleared audio was not transcribed
            # clear, then other audio: only the later audio is transcribed
            await c.append(audio(LONG))
            await c.send("input_audio_buffer.clear", event_id="x")
            await c.stream(audio(SHORT))
            await c.commit()
            await c.commit(final=True)
            deltas, done = await c.until_done()
            text = check_done(deltas, done)
            assert_transcribes([SHORT], [text], bound=30.0)
            assert "printing" not in normalize(text), text

    run(main())


def test_final_while_idle_does_not_wedge_the_session(check_server):
    async def main():
        async with await session(check_server) as c:
            await c.commit(final=True)  # idle, nothing queued
            await c.commit(final=True)
            # a fence: whatever the server answered to the idle finals (nothing, or an empty done)
            # comes before session.updated
            await c.send("session.update", model="tiny.en")
            while (event := await c.recv(30))["type"] != "session.updated":
                assert event["type"] == "transcription.done" and event["text"] == "", event
            deltas, done = await c.transcribe(audio(SHORT))
            assert_transcribes([SHORT], [check_done(deltas, done)], bound=30.0)

    run(main())


async def _stream_live(client: RealtimeClient, pcm: bytes) -> tuple[list[tuple[float, str]], float]:
    """Stream ``pcm`` at real-time pace in 100 ms appends (a microphone) while reading events;
    returns the deltas received before the end of the audio (with their times) and that time."""
    received: list[tuple[float, str]] = []

    async def reader():
        while True:
            event = await client.recv(120)
            assert event["type"] == "transcription.delta", event
            received.append((time.monotonic(), event["delta"]))

    task = asyncio.create_task(reader())
    await client.commit()
    await client.stream(pcm, chunk_s=0.1, interval=0.1)
    end = time.monotonic()
    await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return received, end


def test_deltas_flow_before_final(check_server):
    """The microphone client never sends final: deltas must arrive while audio streams at
    real-time pace. Then final gives a done whose text is all the deltas."""

    async def main():
        async with await session(check_server) as c:
            live, end = await _stream_live(c, audio(MEDIUM))
            early = "".join(d for _, d in live)
            assert early.strip(), "no text was sent before the end of the audio"
            await c.commit(final=True)
            deltas, done = await c.until_done()
            text = check_done([d for _, d in live] + deltas, done)
            assert text.startswith(early)
            assert_transcribes([MEDIUM], [text], bound=25.0)

    run(main())


def test_partials_extension_is_opt_in(check_server):
    """``session.update`` with ``partials: true`` (an extension): after each decoding step a
    ``transcription.partial`` carries the unstable text beyond the deltas; the last one, before
    ``done``, is "" (everything is committed).  Deltas and ``done`` are unchanged, and with
    ``partials: false`` again no partial is sent (``until_done`` fails on any other event)."""

    async def main():
        async with await RealtimeClient.connect(check_server.ws_url) as c:
            assert (await c.update("tiny.en", partials=True))["partials"] is True
            events = []

            async def read():
                while (event := await c.recv(120))["type"] != "transcription.done":
                    events.append(event)
                events.append(event)

            reader = asyncio.create_task(read())
            await c.commit()
            await c.stream(audio(MEDIUM), chunk_s=0.1, interval=0.1)  # real-time pace
            live = list(events)
            await c.commit(final=True)
            await asyncio.wait_for(reader, 120)
            assert {e["type"] for e in events} == {"transcription.delta", "transcription.partial", "transcription.done"}
            partials = [e for e in events if e["type"] == "transcription.partial"]
            assert all(set(e) == {"type", "text"} for e in partials), partials
            assert any(e["type"] == "transcription.partial" and e["text"].strip() for e in live), live
            assert events[-2] == {"type": "transcription.partial", "text": ""}, events[-3:]
            deltas = [e["delta"] for e in events if e["type"] == "transcription.delta"]
            assert_transcribes([MEDIUM], [check_done(deltas, events[-1])], bound=25.0)

            assert (await c.update("tiny.en", partials=False))["partials"] is False
            deltas, done = await c.transcribe(audio(SHORT))
            assert_transcribes([SHORT], [check_done(deltas, done)], bound=30.0)

    run(main())


async def utterance_events(c: RealtimeClient, pcm: bytes, chunk_s: float = 0.1, interval: float = 0.05) -> list[dict]:
    """One utterance streamed (commit, appends, final): every event up to and including ``done``."""
    events: list[dict] = []

    async def read():
        while (event := await c.recv(120))["type"] != "transcription.done":
            assert event["type"] == "transcription.delta", event
            events.append(event)
        events.append(event)

    reader = asyncio.create_task(read())
    await c.commit()
    await c.stream(pcm, chunk_s=chunk_s, interval=interval)
    await c.commit(final=True)
    await asyncio.wait_for(reader, 120)
    return events


def faster_whisper_words(clips: list[np.ndarray]) -> list[list[tuple[str, float, float]]]:
    """The independent reference: faster-whisper's word_timestamps=True on the same tiny.en
    weights (greedy, CPU float32), through scripts/compare_word_timestamps.py."""
    from compare_word_timestamps import faster_whisper, faster_whisper_model

    return faster_whisper(faster_whisper_model(), clips)[0]


def test_word_timestamps_extension_sends_committed_words_once(check_server, check_tight):
    """``session.update`` with ``word_timestamps: true`` (an extension): every delta carries
    ``words``, the committed words not sent before, once each, in stream time (seconds from the
    session's first sample, across utterances).  Checked against faster-whisper's word timestamps
    of the same audio: the words the two share (difflib) start and end within 50 ms at the median
    and 0.4 s at worst (two runs: start/end medians 20/20 ms on the first utterance, 5-15 ms on the
    second; the largest difference 260 ms).  The silence around the speech (1.5 s before the clip,
    2 s after it, which the VAD lets leave without a decode) is covered by no word, and the last
    words still go out.  Off by default: a plain session's deltas have no ``words``; a server
    without word timestamps refuses the field."""

    silence = np.zeros(round(1.5 * 16000), np.float32)
    first = np.concatenate([silence, load_clip(_REFS[LONG]), np.zeros(2 * 16000, np.float32)])
    second = load_clip(_REFS[SHORT])

    async def main():
        async with await session(check_server) as c:
            assert (await c.update("tiny.en", word_timestamps=True))["word_timestamps"] is True
            one = await utterance_events(c, to_pcm16(first))
            two = await utterance_events(c, to_pcm16(second))
        async with await session(check_server) as plain:
            plain_events = await utterance_events(plain, audio(SHORT))
        async with await session(check_tight) as refused:
            await refused.send("session.update", model="tiny.en", word_timestamps=True)
            error = await refused.expect_error("processing_error")
            assert "word" in error["error"], error
            await still_usable(refused)
        return one, two, plain_events

    one, two, plain_events = run(main())
    assert all(set(e) == {"type", "delta"} for e in plain_events[:-1]), plain_events
    check_done([e["delta"] for e in plain_events[:-1]], plain_events[-1])

    reference = faster_whisper_words([first, second])
    offset = len(first) / 16000  # the second utterance starts where the first one's audio ended
    sent: list[dict] = []
    for events, ref, start, duration in ((one, reference[0], 0.0, len(first) / 16000),
                                         (two, reference[1], offset, len(second) / 16000)):
        deltas, done = events[:-1], events[-1]
        text = check_done([e["delta"] for e in deltas], done)
        assert all(set(e) == {"type", "delta", "words"} for e in deltas), deltas
        words = [w for e in deltas for w in e["words"]]
        check_stream_words(words, text, ref, start, duration)
        if start == 0.0:  # the silence before and after the speech holds no word
            assert words[0]["start"] >= 1.3 and words[-1]["end"] <= duration - 1.5, (words[:2], words[-2:])
        sent += words
    assert all(a["end"] <= b["start"] for a, b in zip(sent, sent[1:]))


def test_disconnect_mid_utterance_frees_the_session(check_server):
    """Two clients vanish mid-utterance (one drops TCP, one closes cleanly) while a third streams
    live: /health's session count drops at once, the batcher queue drains, and the third client's
    utterance completes with the right text."""

    async def quitter(abort: bool):
        c = await session(check_server)
        await c.commit()
        await c.stream(audio(LONG)[: 2 * BYTES_PER_SECOND], chunk_s=0.1, interval=0.05)
        if abort:
            c.abort()
        else:
            await c.close()

    async def main():
        async with await session(check_server) as survivor:
            await survivor.commit()
            stream = asyncio.create_task(survivor.stream(audio(MEDIUM), chunk_s=0.1, interval=0.1))
            await asyncio.gather(quitter(abort=True), quitter(abort=False))
            assert not stream.done(), "the survivor finished streaming too early for this test"
            health = await check_server.wait_sessions(1, timeout=5)
            await stream
            await survivor.commit(final=True)
            deltas, done = await survivor.until_done()
            assert_transcribes([MEDIUM], [check_done(deltas, done)], bound=25.0)
        health = await check_server.wait_sessions(0)
        assert health["queue_depth"] == 0, health

    run(main())


def test_eight_concurrent_sessions(check_server):
    """8 sessions stream different clips at once (100 ms appends, faster than real time): each
    gets a correct done, and the texts match their clips."""

    async def one(clip):
        async with await session(check_server) as c:
            deltas, done = await c.transcribe(audio(clip), chunk_s=0.1, interval=0.01, timeout=180)
            return check_done(deltas, done)

    async def main():
        texts = await asyncio.gather(*(one(clip) for clip in EIGHT))
        assert_transcribes(EIGHT, list(texts), bound=25.0)

    run(main(), timeout=400)


def test_fast_client_gets_the_same_text_as_one_append(check_server):
    """vLLM's example client: commit, appends as fast as it can, final. The transcript must not
    depend on how the audio was split: it should equal the transcript of the same audio sent in
    one append before the commit (one window over all of it)."""
    clips = ["ljspeech-LJ001-0008", "hifitts-6097-bambatse_06_haggard_0090",
             "hifitts-6097-nada_lily_15_haggard_0182", "hifitts-6097-bambatse_13_haggard_0083"]

    async def main():
        async with await session(check_server) as c:
            for clip in clips:
                pcm = audio(clip)
                await c.append(pcm)
                await c.commit()
                await c.commit(final=True)
                whole = check_done(*await c.until_done())
                # the first second, a short pause (the server takes its first window), the rest
                await c.commit()
                await c.append(pcm[:BYTES_PER_SECOND + 3200])
                await asyncio.sleep(0.05)
                await c.append(pcm[BYTES_PER_SECOND + 3200:])
                await c.commit(final=True)
                split = check_done(*await c.until_done())
                assert normalize(split) == normalize(whole), (clip, whole, split)

    run(main())


# ======================================================================== limits (tight server)


def test_server_busy_beyond_max_sessions(check_tight):
    async def main():
        a = await RealtimeClient.connect(check_tight.ws_url)
        b = await RealtimeClient.connect(check_tight.ws_url)
        await check_tight.wait_sessions(2)
        c = await RealtimeClient.connect(check_tight.ws_url, expect_created=False)
        await c.expect_error("server_busy")
        closed = await c.closed()
        assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
        await a.close()
        await check_tight.wait_sessions(1)
        d = await RealtimeClient.connect(check_tight.ws_url)  # capacity is back
        await d.update()
        await b.close()
        await d.close()

    run(main())


def test_a_fast_sender_is_paced_not_cut_off(check_tight):
    """The tight server buffers at most 3 s of undecoded audio.  A client streaming 12 s as fast as
    the socket takes it is slowed down (the server stops reading), never refused: no buffer_full,
    and the text covers every clip."""
    clips = [LONG, MEDIUM, SHORT]

    async def main():
        async with await session(check_tight) as c:
            deltas, done = await c.transcribe(b"".join(audio(i) for i in clips), chunk_s=0.1, interval=0.0,
                                              timeout=240)
            return check_done(deltas, done)

    text = run(main(), timeout=300)
    score = wer([" ".join(ref_text(c) for c in clips)], [text])
    assert score <= 20.0, (score, text)


def test_sessions_beyond_the_measured_capacity_are_refused(crowded):
    """With room for one stream, a second connection gets server_busy and 1013 before any audio,
    while the admitted session streams on, in time; once it leaves, the next one is admitted."""

    async def main():
        first = await session(crowded)
        health = await crowded.ahealth()
        assert health["capacity"]["sessions_max"] == 1 and health["capacity"]["headroom"] == 0.0, health
        refused = await RealtimeClient.connect(crowded.ws_url, expect_created=False)
        await refused.expect_error("server_busy")
        closed = await refused.closed()
        assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
        started = time.monotonic()
        deltas, done = await first.transcribe(audio(MEDIUM), chunk_s=0.1, interval=0.1, timeout=60)
        assert time.monotonic() - started < 6.9 + 3.0  # real time, plus little: the admitted one keeps up
        assert_transcribes([MEDIUM], [check_done(deltas, done)], bound=20.0)
        await first.close()
        await crowded.wait_sessions(0)
        again = await session(crowded)  # the room is free again
        await again.close()

    run(main(), timeout=120)
    metrics = urllib.request.urlopen(crowded.http_url + "/metrics", timeout=10).read().decode()
    assert 'jax_realtime_sessions_refused_total{reason="busy"} 1.0' in metrics


def test_idle_timeout_closes_the_socket(check_tight):
    async def main():
        async with await RealtimeClient.connect(check_tight.ws_url) as busy:
            # events every second keep a session alive past the 3 s limit
            for _ in range(4):
                await asyncio.sleep(0.8)
                await busy.append(audio(SHORT)[:3200])
            await busy.send("input_audio_buffer.clear")
            await still_usable(busy)
        async with await RealtimeClient.connect(check_tight.ws_url) as idle:
            started = time.monotonic()
            await idle.expect_error("idle_timeout", timeout=10)
            assert 2.5 <= time.monotonic() - started <= 8
            closed = await idle.closed()
            assert closed.rcvd is not None and closed.rcvd.code == 1000, closed
        await check_tight.wait_sessions(0)

    run(main())


def test_buffer_full_and_oversize_append(check_tight):
    """Queued audio over max_buffer_s (3 s) is buffer_full; an append over max_message_bytes
    (32000) is invalid_audio; in both cases the socket stays open and nothing is queued."""

    async def main():
        async with await session(check_tight) as c:
            pcm = audio(MEDIUM)
            second = BYTES_PER_SECOND
            await c.append(pcm[: second + 2])
            await c.expect_error("invalid_audio", "Invalid audio data")
            await c.append(pcm[:second])  # exactly the limit: accepted
            await c.append(pcm[second: 2 * second])
            await c.append(pcm[2 * second: 3 * second])  # 3 s queued: at the cap
            await c.append(pcm[3 * second: 3 * second + 3200])
            await c.expect_error("buffer_full", "Audio buffer full")
            await still_usable(c)  # no event came between the appends: all but the last accepted
            await c.commit()
            await c.commit(final=True)
            deltas, done = await c.until_done()
            text = check_done(deltas, done)
            assert text.strip(), done  # the first 3 s were queued and transcribed
            # after done the buffer is free again
            await c.append(pcm[:second])
            await c.send("input_audio_buffer.clear")
            await still_usable(c)

    run(main())


def test_silence_at_the_buffer_cap_still_finishes(check_tight):
    """A full buffer of silence: the server stops reading the socket until the utterance takes audio
    in (backpressure), and the VAD lets silence leave the window without a decode.  That must wake
    the reader too, or the final commit behind it is never read (found by scripts/fuzz_realtime.py:
    finals that never got their done)."""

    async def main():
        async with await session(check_tight) as c:
            silence = bytes(BYTES_PER_SECOND)
            for _ in range(3):  # 3 s queued: exactly the cap
                await c.append(silence)
            await c.commit()
            await c.commit(final=True)
            deltas, done = await c.until_done(timeout=30)
            assert check_done(deltas, done) == ""
            await still_usable(c)

    run(main(), timeout=60)


# ======================================================================= Hypercorn, directly


def test_hypercorn_entry_point(tmp_path):
    """The second way to run it: hypercorn -c configs/hypercorn.toml on create_app() with
    $JAX_REALTIME_CONFIG; health, one utterance, no compilation after warm-up, clean shutdown."""
    config = write_config(tmp_path / "hypercorn-app.toml")
    port = free_port()
    argv = [venv_script("hypercorn"), "-c", str(ROOT / "configs" / "hypercorn.toml"),
            "--bind", f"127.0.0.1:{port}", "server.app:create_app()"]
    proc = ServerProcess(argv, port, name="hypercorn", log_path=tmp_path / "hypercorn.log",
                         env={"JAX_REALTIME_CONFIG": str(config)}, startup_timeout=STARTUP_TIMEOUT)
    proc.start()
    try:
        health = proc.health()
        assert health["status"] == "ok" and "tiny.en" in health["models"], health
        assert health["buckets"] == 8, health  # the config was read: 2 x 2 x 2 test buckets

        async def main():
            async with await session(proc, "openai/whisper-tiny.en") as c:
                deltas, done = await c.transcribe(audio(LONG))
                assert_transcribes([LONG], [check_done(deltas, done)], bound=25.0)
            await proc.wait_sessions(0)

        run(main())
        after = proc.health()["compile"]["compilations"]
        assert after == proc.baseline_compilations, (proc.baseline_compilations, after)
    finally:
        started = time.monotonic()
        code = proc.stop(timeout=40)
    assert code == 0 and time.monotonic() - started < 35, (code, proc.log_tail())


# ============================================================================ after everything


def test_zz_no_compilation_after_warmup(server):
    """Runs last: the servers compiled nothing while serving every test above."""
    assert server in _STARTED
    for proc in _STARTED:
        assert proc.alive(), proc.log_tail()
        stats = proc.health()["compile"]
        assert stats["compilations"] == proc.baseline_compilations, (proc.name, proc.baseline_compilations, stats)
