"""OpenAI's Realtime API (transcription mode) end to end, with the official ``openai`` SDK.

One real server process for the module (tiny.en, the test buckets), spoken to by
``client.realtime.connect`` (GA: ``?intent=transcription``), ``client.beta.realtime.connect`` (beta:
``OpenAI-Beta: realtime=v1``) and ``client.audio.transcriptions.create(stream=True)``:

* server VAD: a recording of several clips with silences between them gives one ``completed`` per
  clip, its deltas before it and joined equal to it, within 1 WER point of the offline transcripts;
* manual mode (``turn_detection: null`` and commits); 24 kHz PCM, µ-law and A-law give the text
  16 kHz PCM gives over vLLM's protocol on the same server;
* bad events get OpenAI's ``error`` events and the session goes on; the beta resource;
* REST streaming in OpenAI's shape; nothing compiled after warm-up.

Inputs are kept short: CI is a 2-core machine.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json

import numpy as np
import pytest
import soxr

from conftest import check_stream_words, load_clip, load_refs
from harness.service_config import write_config
from jax_realtime.audio import ALAW_TABLE, ULAW_TABLE
from harness.evaluation import wer
from harness.realtime_client import RealtimeClient, ServerProcess, run, to_pcm16

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 900.0
_REFS = {r["id"]: r for r in load_refs() if r["language"] == "en"}
TURN_CLIPS = ["hifitts-6097-shortstories_05_gaskell_0539", "hifitts-6097-presentpictureofnsw_02_mann_0083",
              "ljspeech-LJ001-0016"]
MANUAL_CLIPS = ["ljspeech-LJ001-0008", "hifitts-6097-bambatse_13_haggard_0083"]
GAP_S = 1.5
TRANSCRIPTION = "conversation.item.input_audio_transcription"


@functools.cache
def clip(clip_id: str) -> np.ndarray:
    return load_clip(_REFS[clip_id])


def ref(clip_id: str) -> str:
    return _REFS[clip_id]["text"]


@functools.cache
def reference_words(clip_id: str) -> list[tuple[str, float, float]]:
    """faster-whisper's word timestamps of a clip (tiny.en, greedy): the independent reference."""
    from compare_word_timestamps import faster_whisper, faster_whisper_model

    return faster_whisper(faster_whisper_model(), [clip(clip_id)])[0][0]


def delta_words(deltas) -> list[dict]:
    """The ``words`` the deltas carried (the extension: a key every delta of the session has)."""
    assert all("words" in e.to_dict() for e in deltas), deltas
    return [w for e in deltas for w in e.to_dict()["words"]]


def pcm24(audio: np.ndarray) -> bytes:
    return to_pcm16(soxr.resample(audio, 16000, 24000).astype(np.float32))


def _g711(audio: np.ndarray, table: np.ndarray) -> bytes:
    """16 kHz audio as G.711 at 8 kHz (nearest code; the encoder is test-only)."""
    x = np.clip(np.round(soxr.resample(audio, 16000, 8000) * 32768), -32768, 32767).astype(np.int32)
    order = np.argsort(table)
    values = table[order].astype(np.int32)
    idx = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
    nearer = np.where(np.abs(values[idx - 1] - x) <= np.abs(values[idx] - x), idx - 1, idx)
    return order[nearer].astype(np.uint8).tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------ server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openai")
    config = write_config(tmp / "serve.toml", engine={"word_timestamps": True}, admission_control=False)
    proc = ServerProcess.serve(config, name="openai", log_path=tmp / "serve.log", startup_timeout=STARTUP_TIMEOUT)
    proc.start()
    yield proc
    proc.stop()


def async_client(proc: ServerProcess, **kwargs) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proc.http_url + "/v1", api_key="no-key-needed", **kwargs)


async def recv(conn, timeout: float = 60.0):
    return await asyncio.wait_for(conn.recv(), timeout)


async def until(conn, kind: str, events: list | None = None, timeout: float = 90.0):
    """Read events until one of type ``kind`` (every event read is added to ``events``)."""
    while True:
        event = await recv(conn, timeout)
        if events is not None:
            events.append(event)
        if event.type == kind:
            return event


async def append(conn, data: bytes, piece: int, interval: float = 0.0) -> None:
    for i in range(0, len(data), piece):
        await conn.input_audio_buffer.append(audio=b64(data[i:i + piece]))
        await asyncio.sleep(interval)


GA_MANUAL = {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": 24000},
    "transcription": {"model": "tiny.en", "language": "en"},
    "turn_detection": None}}}


# ------------------------------------------------------------------------------------ server VAD

def test_ga_server_vad_turns(server):
    """Three clips with 1.5 s of silence between them, streamed at real time in 24 kHz PCM:
    speech_started/speech_stopped/committed per clip with one item id, deltas (some during the
    turn, before its speech_stopped) then ``completed`` equal to their join, items chained by
    ``previous_item_id``, and the turns' WER within 1 point of the offline transcripts.  The session
    asks for word timestamps (an extension): the deltas' words, in seconds of the session's audio,
    are each turn's text, inside its clip, and within 50 ms (median) of faster-whisper's."""
    gap = np.zeros(round(GAP_S * 16000), np.float32)
    recording = np.concatenate([gap[:8000]] + [x for c in TURN_CLIPS for x in (clip(c), gap)])

    async def session():
        client = async_client(server)
        events = []
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            created = await recv(conn)
            assert created.type == "session.created" and created.session.type == "transcription", created
            assert created.session.audio.input.turn_detection.type == "server_vad"  # OpenAI's default
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "tiny.en", "language": "en", "word_timestamps": True},
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                   "silence_duration_ms": 500}}}})
            updated = await until(conn, "session.updated")
            assert updated.session.audio.input.transcription.to_dict()["word_timestamps"] is True
            assert type(updated.session).__name__ == "RealtimeTranscriptionSessionCreateRequest", updated
            sender = asyncio.create_task(append(conn, pcm24(recording), 4800, 0.1))  # real time, as a microphone
            for _ in TURN_CLIPS:
                await until(conn, "conversation.item.done", events)
            await sender
        return events

    events = run(session(), timeout=240)
    kinds = [e.type for e in events]
    assert "error" not in kinds, [e for e in events if e.type == "error"]
    completed = [e for e in events if e.type == f"{TRANSCRIPTION}.completed"]
    assert len(completed) == len(TURN_CLIPS)
    items = [e.item_id for e in completed]
    assert len(set(items)) == len(items)
    during = 0
    previous = None
    for n, item in enumerate(items):
        mine = [(i, e) for i, e in enumerate(events) if getattr(e, "item_id", None) == item
                or getattr(getattr(e, "item", None), "id", None) == item]
        order = [e.type for _, e in mine]
        assert order[0] == "input_audio_buffer.speech_started", order
        start = next(e for _, e in mine if e.type == "input_audio_buffer.speech_started")
        stop = next(e for _, e in mine if e.type == "input_audio_buffer.speech_stopped")
        committed = next(e for _, e in mine if e.type == "input_audio_buffer.committed")
        assert committed.previous_item_id == previous
        previous = item
        assert order.index("input_audio_buffer.speech_stopped") < order.index("input_audio_buffer.committed") \
            < order.index("conversation.item.added") < order.index(f"{TRANSCRIPTION}.completed") \
            < order.index("conversation.item.done"), order
        # the clip's place in the recording (ms), with the 300 ms prefix and 500 ms of silence
        clip_start = 500 + sum(1000 * len(clip(c)) / 16000 + 1000 * GAP_S for c in TURN_CLIPS[:n])
        clip_end = clip_start + 1000 * len(clip(TURN_CLIPS[n])) / 16000
        assert clip_start - 300 - 200 <= start.audio_start_ms <= clip_start + 300, (start, clip_start)
        assert clip_end - 500 <= stop.audio_end_ms <= clip_end + 500 + 500, (stop, clip_end)
        deltas = [(i, e.delta) for i, e in mine if e.type == f"{TRANSCRIPTION}.delta"]
        assert deltas, order
        done_at = next(i for i, e in mine if e.type == f"{TRANSCRIPTION}.completed")
        assert all(i < done_at for i, _ in deltas)
        assert "".join(d for _, d in deltas) == completed[n].transcript
        assert completed[n].usage.type == "duration" and completed[n].usage.seconds > 1.0
        stop_at = next(i for i, e in mine if e.type == "input_audio_buffer.speech_stopped")
        during += any(i < stop_at for i, _ in deltas)
        done = next(e for _, e in mine if e.type == "conversation.item.done")
        assert done.item.content[0].transcript == completed[n].transcript
        words = delta_words([e for _, e in mine if e.type == f"{TRANSCRIPTION}.delta"])
        check_stream_words(words, completed[n].transcript, reference_words(TURN_CLIPS[n]), start.audio_start_ms / 1000,
                           (stop.audio_end_ms - start.audio_start_ms) / 1000, reference_offset=clip_start / 1000)
    assert during >= 1, ("no delta arrived while a turn was being spoken", kinds)

    offline = [transcribe_rest(server, clip(c)) for c in TURN_CLIPS]
    turns = [e.transcript for e in completed]
    refs = [ref(c) for c in TURN_CLIPS]
    assert wer(refs, turns) <= wer(refs, offline) + 1.0, (turns, offline)


def transcribe_rest(proc: ServerProcess, audio: np.ndarray, **kwargs):
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, 16000, format="WAV", subtype="PCM_16")
    client = openai.OpenAI(base_url=proc.http_url + "/v1", api_key="no-key-needed")
    result = client.audio.transcriptions.create(file=("clip.wav", buffer.getvalue()), model="tiny.en", **kwargs)
    return result if kwargs.get("stream") else result.text


# ------------------------------------------------------------------------------------ manual mode

async def _manual(proc: ServerProcess, fmt: dict, data: list[bytes], piece: int) -> list[str]:
    """A GA session in manual mode: each recording appended, then committed; the transcripts."""
    client = async_client(proc)
    texts = []
    async with client.realtime.connect(model="tiny.en") as conn:  # ?model= selects GA too
        session = json.loads(json.dumps(GA_MANUAL))
        session["audio"]["input"]["format"] = fmt
        await conn.session.update(session=session)
        updated = await until(conn, "session.updated")
        source = updated.session.audio.input
        assert source.format.type == fmt["type"] and source.turn_detection is None
        for recording in data:
            await append(conn, recording, piece)
            await conn.input_audio_buffer.commit()
            events = []
            done = await until(conn, f"{TRANSCRIPTION}.completed", events)
            kinds = [e.type for e in events]
            assert kinds[:2] == ["input_audio_buffer.committed", "conversation.item.added"], kinds
            deltas = [e.delta for e in events if e.type == f"{TRANSCRIPTION}.delta"]
            assert "".join(deltas) == done.transcript and all(e.item_id == done.item_id for e in events[:1])
            assert (await recv(conn)).type == "conversation.item.done"
            texts.append(done.transcript)
    return texts


def _vllm_texts(proc: ServerProcess, clips: list[np.ndarray]) -> list[str]:
    """The same recordings in 16 kHz PCM over vLLM's protocol (bare path): the reference text."""
    async def session():
        texts = []
        async with await RealtimeClient.connect(proc.ws_url) as c:
            await c.update("tiny.en", language="en")
            for audio in clips:
                await c.commit()
                await c.stream(to_pcm16(audio), 0.1)
                await c.commit(final=True)
                while (event := await c.recv(90))["type"] != "transcription.done":
                    assert event["type"] == "transcription.delta", event
                texts.append(event["text"])
        return texts

    return run(session(), timeout=180)


def test_ga_manual_mode_and_formats(server):
    """``turn_detection: null``: each commit is one item.  24 kHz PCM gives the text 16 kHz PCM gives
    over vLLM's protocol; G.711 µ-law and A-law (8 kHz telephone audio) give it too."""
    audio = [clip(c) for c in MANUAL_CLIPS]
    reference = _vllm_texts(server, audio)
    assert all(t.strip() for t in reference), reference
    texts = run(_manual(server, {"type": "audio/pcm", "rate": 24000}, [pcm24(a) for a in audio], 4800), timeout=180)
    assert texts == reference
    for kind, table in (("audio/pcmu", ULAW_TABLE), ("audio/pcma", ALAW_TABLE)):
        texts = run(_manual(server, {"type": kind}, [_g711(a, table) for a in audio], 800), timeout=180)
        assert wer(reference, texts) <= 10.0, (kind, texts, reference)


# ------------------------------------------------------------------------------------ errors

def test_bad_events_get_openai_errors_and_the_session_goes_on(server):
    async def session():
        client = async_client(server)
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            assert (await recv(conn)).type == "session.created"

            async def error(event, code: str, param=None, raw: str | None = None):
                if raw is not None:
                    await conn.send_raw(raw)
                else:
                    await conn.send(event)
                e = await until(conn, "error")
                assert e.error.code == code and e.error.type == "invalid_request_error", e
                assert e.error.message and e.event_id.startswith("event_"), e
                if param is not None:
                    assert e.error.param == param, e
                return e

            await error(None, "invalid_json", raw="{not json")
            await error({"event_id": "mine"}, "invalid_event", "type")
            e = await error({"type": "input_audio_buffer.frobnicate", "event_id": "evt_1"}, "invalid_value", "type")
            assert e.error.event_id == "evt_1"
            await error({"type": "response.create"}, "unsupported_event", "type")
            await error({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type")
            await error({"type": "session.update", "session": {}}, "missing_required_parameter", "session.type")
            await error({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 16000}}}}}, "invalid_value", "session.audio.input.format.rate")
            await error({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "format": "pcm16"}}}}, "invalid_type", "session.audio.input.format")
            await error({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "transcription": {"model": "gpt-4o-transcribe"}}}}}, "model_not_found",
                "session.audio.input.transcription.model")
            await error({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                "transcription": {"model": "tiny.en", "language": "de"}}}}}, "invalid_value",
                "session.audio.input.transcription.language")
            await error({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio")
            await conn.session.update(session=GA_MANUAL)  # the session still answers
            await until(conn, "session.updated")
            await error({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty")
            await conn.input_audio_buffer.append(audio=b64(pcm24(clip("ljspeech-LJ001-0008"))[:4800]))
            await conn.input_audio_buffer.clear()
            assert (await recv(conn)).type == "input_audio_buffer.cleared"
            await error({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty")  # cleared
            await append(conn, pcm24(clip("ljspeech-LJ001-0008")), 4800)
            await conn.input_audio_buffer.commit()
            done = await until(conn, f"{TRANSCRIPTION}.completed")
            assert wer([ref("ljspeech-LJ001-0008")], [done.transcript]) <= 20, done

    run(session(), timeout=180)


# ------------------------------------------------------------------------------------ beta

def test_beta_transcription_session(server):
    """``client.beta.realtime.connect``: transcription_session.created/updated, pcm16 (24 kHz) with
    manual commits, conversation.item.created, deltas and completed; the word timestamps extension
    (held with the text until the commit)."""
    audio = clip("ljspeech-LJ001-0008")

    async def session():
        client = async_client(server, websocket_base_url=server.ws_url.rsplit("/realtime", 1)[0])
        async with client.beta.realtime.connect(model="tiny.en") as conn:
            created = await recv(conn)
            assert created.type == "transcription_session.created", created
            await conn.transcription_session.update(session={
                "input_audio_format": "pcm16", "turn_detection": None,
                "input_audio_transcription": {"model": "tiny.en", "language": "en", "prompt": "",
                                              "word_timestamps": True},
                "input_audio_noise_reduction": {"type": "near_field"}})
            updated = await until(conn, "transcription_session.updated")
            assert updated.session.input_audio_format == "pcm16" and updated.session.turn_detection is None
            await append(conn, pcm24(audio), 4800)
            await conn.input_audio_buffer.commit()
            events = []
            done = await until(conn, f"{TRANSCRIPTION}.completed", events)
            kinds = [e.type for e in events]
            assert kinds[:2] == ["input_audio_buffer.committed", "conversation.item.created"], kinds
            deltas = [e for e in events if e.type == f"{TRANSCRIPTION}.delta"]
            assert "".join(e.delta for e in deltas) == done.transcript
            return done.transcript, delta_words(deltas)

    text, words = run(session(), timeout=120)
    assert wer([ref("ljspeech-LJ001-0008")], [text]) <= 20, text
    # manual mode: the words of the text decoded before the commit come with it, then the rest
    check_stream_words(words, text, reference_words("ljspeech-LJ001-0008"), 0.0, len(audio) / 16000)


def test_ga_on_the_bare_path(server):
    """A GA client that connects to the bare path (no query) is recognised by its first
    ``session.update`` (a transcription ``session``) and answered in GA's shape."""
    async def session():
        async with await RealtimeClient.connect(server.ws_url) as c:
            assert c.created["type"] == "session.created"  # vLLM's, sent before the client spoke
            await c.send("session.update", session=GA_MANUAL)
            created = await c.expect("session.created")
            assert created["session"]["type"] == "transcription"
            updated = await c.expect("session.updated")
            assert updated["session"]["audio"]["input"]["turn_detection"] is None

    run(session(), timeout=60)


def test_vllm_session_with_turn_detection(server):
    """vLLM's protocol with the ``turn_detection`` extension: no commit at all, one
    ``transcription.done`` per spoken turn (deltas before each), the same text as the GA turns."""
    gap = np.zeros(round(GAP_S * 16000), np.float32)
    clips = TURN_CLIPS[:2]
    recording = np.concatenate([gap[:8000]] + [x for c in clips for x in (clip(c), gap)])

    async def session():
        async with await RealtimeClient.connect(server.ws_url) as c:
            updated = await c.update("tiny.en", language="en", turn_detection={"type": "server_vad"})
            assert updated["turn_detection"] == {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                                 "silence_duration_ms": 500}
            sender = asyncio.create_task(c.stream(to_pcm16(recording), 0.1, 0.05))
            dones, deltas = [], []
            while len(dones) < len(clips):
                event = await c.recv(90)
                assert event["type"] in ("transcription.delta", "transcription.done"), event
                if event["type"] == "transcription.delta":
                    deltas.append(event["delta"])
                else:
                    assert "".join(deltas) == event["text"], (deltas, event)
                    dones.append(event["text"])
                    deltas = []
            await sender
            return dones

    texts = run(session(), timeout=120)
    assert wer([ref(c) for c in clips], texts) <= 15.0, texts


# ------------------------------------------------------------------------------------ REST

def test_rest_stream_in_openai_shape(server):
    """``create(stream=True)``: typed ``transcript.text.delta`` events whose join is the
    non-streamed text, then ``transcript.text.done`` with the text and token usage."""
    audio = np.concatenate([clip("ljspeech-LJ001-0016"), clip("ljspeech-LJ001-0030")] * 3)  # ~37 s: 2 windows
    text = transcribe_rest(server, audio)
    events = list(transcribe_rest(server, audio, stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2 and all(type(e).__name__ == "TranscriptionTextDeltaEvent" for e in deltas), events
    assert "".join(e.delta for e in deltas) == text
    done = events[-1]
    assert type(done).__name__ == "TranscriptionTextDoneEvent" and done.text == text, done
    assert done.usage.type == "tokens" and done.usage.output_tokens > 20
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


def test_zz_no_compilation_after_warmup(server):
    stats = server.health()["compile"]
    assert stats["compilations"] == server.baseline_compilations, stats
