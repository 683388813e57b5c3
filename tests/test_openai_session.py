"""The session logic of both realtime dialects, fast: a real session object (``connection.py``,
``openai_realtime.py``) on a fake socket and a fake engine that answers every window with the same
few words (no JAX), and the real Silero VAD.  What is checked is the order and shape of the
events (turns, items, commits, clears, errors), not the text; tests/test_openai_realtime.py
checks the text on the real engine."""

from __future__ import annotations

import asyncio
import base64
import json
import types

import numpy as np
import pytest
import soxr

from conftest import load_clip, load_refs
from jax_realtime.config import load_config
from jax_realtime.vad import VADBatcher, shared

GAP = np.zeros(24000, np.float32)  # 1.5 s
TRANSCRIPTION = "conversation.item.input_audio_transcription"


@pytest.fixture(scope="module")
def clips():
    refs = {r["id"]: r for r in load_refs()}
    return [load_clip(refs[i]) for i in ("ljspeech-LJ001-0008", "hifitts-6097-bambatse_13_haggard_0083")]


class _Engine:
    """Every window decodes to ``<|0.00|> hello world this<|end|>`` (continuing its prefix)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.words = tokenizer.encode(" hello world this")
        self.calls = 0

    async def submit(self, owner, request):
        await asyncio.sleep(0.005)
        self.calls += 1
        end = self.tok.timestamp_begin + min(1500, int(len(request.audio) / 16000 / 0.02))
        start = [] if request.prefix else [self.tok.timestamp_begin]
        return types.SimpleNamespace(tokens=list(request.prefix) + start + self.words + [end], no_speech_prob=0.0,
                                     avg_logprob=-0.1, compression_ratio=1.0, prompt_tokens=5)

    def cancel(self, owner):
        return 0


class _Any:
    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self


class _Service:
    def __init__(self, tokenizer):
        self.config = load_config()
        self.engine = types.SimpleNamespace(tokenizer=tokenizer)
        self.batcher = _Engine(tokenizer)
        self.model_names = ("tiny.en",)
        self.metrics = _Any()
        self.vad = VADBatcher(shared())
        self.draining = asyncio.Event()
        self.sessions = set()

    def serves(self, model):
        return model in self.model_names

    def admits_session(self):
        return True

    def note_streaming(self):
        pass


class _Socket:
    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.out: list[dict] = []

    async def accept(self, *args, **kwargs):
        pass

    async def receive(self):
        return await self.inbox.get()

    async def send(self, message):
        self.out.append(json.loads(message))

    async def close(self, *args):
        pass


class _Session:
    def __init__(self, tokenizer, dialect: str):
        from server.connection import RealtimeConnection
        from server.openai_realtime import OpenAIConnection, upgrade

        self.ws, self.service = _Socket(), _Service(tokenizer)
        if dialect == "vllm":  # as the route builds it: a GA client's first event may upgrade it
            self.conn = RealtimeConnection(self.ws, self.service, upgrade=upgrade)
        else:
            self.conn = OpenAIConnection(self.ws, self.service, beta=dialect == "beta")
        self.task = asyncio.ensure_future(self.conn.serve())

    def send(self, **event):
        self.ws.inbox.put_nowait(json.dumps(event))

    async def append(self, data: bytes, piece: int, pause: float = 0.0):
        for i in range(0, len(data), piece):
            self.send(type="input_audio_buffer.append", audio=base64.b64encode(data[i:i + piece]).decode())
            await asyncio.sleep(pause)

    async def until(self, predicate, timeout: float = 20.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self.ws.out):
            assert asyncio.get_running_loop().time() < deadline, self.ws.out
            await asyncio.sleep(0.02)
        return self.ws.out

    def types(self):
        return [e["type"] for e in self.ws.out]

    def close(self):
        self.task.cancel()


def pcm24(audio):
    return (soxr.resample(audio, 16000, 24000) * 32767).astype("<i2").tobytes()


def count(kind):
    return lambda events: sum(e["type"] == kind for e in events)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_ga_manual_mode(tiny_tokenizer, clips):
    """Commits make items; every server event has an event_id; a too short commit, a cleared
    buffer and bad events are errors that leave the session working."""
    async def main():
        s = _Session(tiny_tokenizer, "ga")
        s.send(type="session.update", session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        s.send(type="input_audio_buffer.commit", event_id="mine")
        for audio in clips:
            await s.append(pcm24(audio), 4800)
            s.send(type="input_audio_buffer.commit")
        await s.append(pcm24(clips[0])[:9600], 4800)
        s.send(type="input_audio_buffer.clear")
        s.send(type="input_audio_buffer.commit")
        s.send(type="response.create")
        await s.until(lambda ev: count("conversation.item.done")(ev) == 2 and count("error")(ev) == 3)
        s.close()
        return s.ws.out

    events = run(main())
    assert all(e["event_id"].startswith("event_") and len(e["event_id"]) == 27 for e in events)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["session.created", "session.updated", "error"]
    assert events[2]["error"]["code"] == "input_audio_buffer_commit_empty" and events[2]["error"]["event_id"] == "mine"
    assert events[1]["session"]["audio"]["input"]["turn_detection"] is None
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert [c["previous_item_id"] for c in committed] == [None, committed[0]["item_id"]]
    for c in committed:
        mine = [e["type"] for e in events if c["item_id"] in (e.get("item_id"), e.get("item", {}).get("id"))]
        assert mine[:2] == ["input_audio_buffer.committed", "conversation.item.added"]
        assert mine[-2:] == [f"{TRANSCRIPTION}.completed", "conversation.item.done"]
        deltas = [e["delta"] for e in events if e["type"] == f"{TRANSCRIPTION}.delta" and e["item_id"] == c["item_id"]]
        done = next(e for e in events if e["type"] == f"{TRANSCRIPTION}.completed" and e["item_id"] == c["item_id"])
        assert deltas and "".join(deltas) == done["transcript"]
        assert done["usage"]["type"] == "duration" and done["usage"]["seconds"] > 1
    assert "input_audio_buffer.cleared" in kinds
    errors = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert errors == ["input_audio_buffer_commit_empty", "input_audio_buffer_commit_empty", "unsupported_event"]


def test_ga_server_vad(tiny_tokenizer, clips):
    """The VAD finds the two clips: speech_started/stopped with session-time ms, then the item."""
    async def main():
        s = _Session(tiny_tokenizer, "ga")
        audio = np.concatenate([GAP, clips[0], GAP, clips[1], GAP])
        await s.append(pcm24(audio), 4800, 0.005)
        await s.until(lambda ev: count("conversation.item.done")(ev) == 2)
        s.close()
        return s.ws.out

    events = run(main())
    kinds = [e["type"] for e in events]
    assert events[0]["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    starts = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stops = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert len(starts) == len(stops) == 2
    at = [1500, 1500 + 1000 * len(clips[0]) / 16000 + 1500]
    for start, stop, clip_at, audio in zip(starts, stops, at, clips):
        assert start["item_id"] == stop["item_id"]
        assert clip_at - 300 <= start["audio_start_ms"] <= clip_at + 500, (start, clip_at)
        assert clip_at + 1000 * len(audio) / 16000 - 500 <= stop["audio_end_ms"] <= clip_at + 1000 * len(audio) / 16000 + 1000
        mine = [e["type"] for e in events if start["item_id"] in (e.get("item_id"), e.get("item", {}).get("id"))]
        assert mine[:4] == ["input_audio_buffer.speech_started", *mine[1:4]]
        assert mine.index("input_audio_buffer.speech_stopped") < mine.index("input_audio_buffer.committed") < \
            mine.index("conversation.item.added") < mine.index(f"{TRANSCRIPTION}.completed")
    assert kinds.count(f"{TRANSCRIPTION}.completed") == 2


def test_clear_drops_the_running_turn_and_vad_can_be_turned_on(tiny_tokenizer, clips):
    """Manual mode: a turn decoded for a while, then cleared, sends nothing; turning the VAD on
    afterwards finds the next clip, with times counting all the session's audio."""
    async def main():
        s = _Session(tiny_tokenizer, "ga")
        s.send(type="session.update", session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        await s.append(pcm24(clips[1]), 4800)
        await asyncio.sleep(1.5)  # the turn's utterance decodes meanwhile
        s.send(type="input_audio_buffer.clear")
        s.send(type="session.update", session={"type": "transcription", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 400}}}})
        await s.append(pcm24(np.concatenate([GAP, clips[0], GAP])), 4800, 0.005)
        await s.until(count("conversation.item.done"))
        s.close()
        return s.ws.out, s.service.batcher.calls

    events, calls = run(main())
    kinds = [e["type"] for e in events]
    assert calls >= 2  # the cleared turn was being decoded
    assert kinds.count("input_audio_buffer.committed") == 1 and kinds.count(f"{TRANSCRIPTION}.completed") == 1
    assert events[kinds.index("session.updated", 2)]["session"]["audio"]["input"]["turn_detection"][
        "silence_duration_ms"] == 400
    start = next(e for e in events if e["type"] == "input_audio_buffer.speech_started")
    assert start["audio_start_ms"] >= 1000 * len(clips[1]) / 16000 + 1000, start  # 1.5 s of silence first


def test_beta_and_g711(tiny_tokenizer, clips):
    async def main():
        s = _Session(tiny_tokenizer, "beta")
        s.send(type="transcription_session.update", session={"input_audio_format": "g711_alaw", "turn_detection": None})
        s.send(type="session.update", session={})
        s.send(type="transcription_session.update", session={"input_audio_format": "g711-alaw"})
        await s.append(bytes(range(256)) * 20, 800)
        s.send(type="input_audio_buffer.commit")
        await s.until(count(f"{TRANSCRIPTION}.completed"))
        s.close()
        return s.ws.out

    events = run(main())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["transcription_session.created", "transcription_session.updated"]
    assert events[1]["session"]["input_audio_format"] == "g711_alaw" and events[1]["session"]["turn_detection"] is None
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["unsupported_event", "invalid_value"]
    assert errors[1]["param"] == "session.input_audio_format" and "'g711_ulaw'" in errors[1]["message"]
    assert kinds[-4:-2] == ["input_audio_buffer.committed", "conversation.item.created"] or \
        "conversation.item.created" in kinds
    done = events[-1]
    assert done["type"] == f"{TRANSCRIPTION}.completed" and abs(done["usage"]["seconds"] - 20 * 256 / 8000) < 0.01


def test_vllm_unchanged_and_its_turn_detection(tiny_tokenizer, clips):
    """vLLM's protocol: commit/final as before; with ``turn_detection``, one done per spoken turn."""
    async def main():
        s = _Session(tiny_tokenizer, "vllm")
        s.send(type="session.update", model="tiny.en")
        s.send(type="input_audio_buffer.commit")
        await s.append((clips[0] * 32767).astype("<i2").tobytes(), 3200)
        s.send(type="input_audio_buffer.commit", final=True)
        await s.until(count("transcription.done"))
        s.send(type="session.update", model="tiny.en", turn_detection={"type": "server_vad"})
        audio = np.concatenate([GAP, clips[0], GAP, clips[1], GAP])
        await s.append((audio * 32767).astype("<i2").tobytes(), 3200, 0.005)
        await s.until(lambda ev: count("transcription.done")(ev) == 3)
        s.close()
        return s.ws.out

    events = run(main())
    kinds = [e["type"] for e in events]
    assert set(kinds) == {"session.created", "session.updated", "transcription.delta", "transcription.done"}, kinds
    assert "turn_detection" not in events[1] and events[-1]["type"] == "transcription.done"
    assert events[kinds.index("session.updated", 2)]["turn_detection"]["type"] == "server_vad"


def test_ga_client_on_the_bare_path(tiny_tokenizer):
    """A first ``session.update`` with a transcription ``session`` turns a vLLM session into GA's:
    GA's session.created (after vLLM's), then session.updated for that very update."""
    async def main():
        s = _Session(tiny_tokenizer, "vllm")
        s.send(type="session.update", session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})
        await s.until(lambda ev: len(ev) >= 3)
        s.close()
        return s.ws.out

    events = run(main())
    assert [e["type"] for e in events] == ["session.created", "session.created", "session.updated"]
    assert "session" not in events[0] and events[1]["session"]["type"] == "transcription"
    assert events[2]["session"]["audio"]["input"]["turn_detection"] is None


def test_turn_clock_counts_audio_dropped_from_an_utterance():
    """Word times are seconds of the session's audio: a turn's own start, plus the audio vLLM's
    ``clear`` dropped from its utterance before the time in question."""
    from server.connection import Turn

    turn = Turn(start_sample=32000, gaps=[(16000, 8000)])  # 2 s in; 0.5 s dropped at its 1 s
    assert [turn.session_seconds(t) for t in (0.0, 0.5, 1.0, 1.5)] == [2.0, 2.5, 3.5, 4.0]
