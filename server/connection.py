"""One WebSocket session of ``/v1/realtime``: an explicit state machine and its tasks.

Three tasks per socket, none of which waits on the device:

* the *receive* loop (the handler's own task) parses events and changes state;
* the *send* task writes queued events to the socket, in order;
* the *utterance* task drives the streaming policy: it submits windows to the shared batcher,
  awaits their results and turns them into ``transcription.delta`` / ``transcription.done``.

States::

    UNVALIDATED --session.update ok--> IDLE --commit--> STREAMING --commit final--> FINISHING
        ^                               ^                                               |
        |                               +------------- transcription.done --------------+

Turns.  Each utterance is a :class:`Turn`: opened by a commit (vLLM), by the first audio after a
commit (OpenAI's manual mode) or by the VAD hearing speech (``turn_detection``), and closed by
``final``, by OpenAI's commit or by the silence after the speech.  One turn's utterance runs at a
time; a turn opened while the previous one finishes waits in ``_turns`` with its audio.

This class speaks vLLM's protocol; ``openai_realtime.py`` speaks OpenAI's (GA and beta) over the
same turns, utterances and policy, by overriding the ``_parse``/``_handle`` and ``_emit_*`` hooks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import json
import logging
import time

import numpy as np

from jax_realtime.audio import SAMPLE_RATE, InputFormat, Leveller
from jax_realtime.batcher import Busy, EngineError
from jax_realtime.engine import AlignRequest, DecodeRequest
from jax_realtime.streaming import AudioBuffer, Utterance
from jax_realtime.tokenizer import MAX_PROMPT_CHARS
from jax_realtime.vad import FRAME, THRESHOLD, TurnDetector, TurnSettings, VADBatcher, VADStream

from . import protocol as p
from .service import Service

log = logging.getLogger("jax_realtime.session")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013
# Events waiting to be written to one socket.  A client that lets this many pile up does not read
# what it is sent (deltas, or the error events its own bad frames cause): it is disconnected with
# 1008 rather than allowed to grow the server's memory.
OUTBOX_LIMIT = 1000
BUSY_RETRY_S = 0.05  # a realtime step the batcher could not queue is submitted again after this
WORDS_OFF = ("word_timestamps: word-level timestamps are not enabled on this server (start it with "
             "--word-timestamps or [engine] word_timestamps = true)")


class State(enum.Enum):
    UNVALIDATED = "unvalidated"
    IDLE = "idle"
    STREAMING = "streaming"
    FINISHING = "finishing"


@dataclasses.dataclass(eq=False)
class Turn:
    """One utterance of the session, from its opening to its transcript."""

    item_id: str | None = None  # OpenAI's item id (None in vLLM's protocol)
    previous_item_id: str | None = None
    chunks: list = dataclasses.field(default_factory=list)  # audio held until its utterance starts
    utterance: Utterance | None = None
    closed: bool = False  # its audio is complete (final, commit, or the silence after speech)
    announced: bool = False  # its deltas may be sent as they come (else held until it is committed)
    samples: int = 0  # audio it holds (16 kHz)
    start_sample: int = 0  # where it starts in the session's audio
    end_sample: int = 0
    # audio dropped from its utterance (vLLM's clear mid-utterance): (utterance sample, samples)
    gaps: list = dataclasses.field(default_factory=list)
    held_text: str = ""  # deltas not announced yet (OpenAI's manual mode: sent at the commit)
    held_words: list | None = None  # and their words

    def session_seconds(self, t: float) -> float:
        """Utterance seconds ``t`` as seconds of the session's audio (word timestamps)."""
        shift = sum(n for at, n in self.gaps if t * SAMPLE_RATE >= at)
        return round((self.start_sample + shift) / SAMPLE_RATE + t, 2)


_turn_vad: VADBatcher | None = None


def turn_vad(service: Service) -> VADBatcher:
    """The VAD that detects turns: the service's (``[stream] vad``), else one made for turns."""
    global _turn_vad
    if service.vad is not None:
        return service.vad
    if _turn_vad is None:
        _turn_vad = VADBatcher()
    return _turn_vad


class RealtimeConnection:
    # OpenAI's manual mode: audio appended with no turn open opens one (vLLM queues it for a commit)
    audio_opens_turns = False

    def __init__(self, websocket, service: Service, upgrade=None):
        self.ws = websocket
        self.service = service
        # (connection, first message) -> the connection of another dialect, or None: a client of
        # another protocol recognised by its first event (realtime.py passes OpenAI's GA check)
        self._upgrade = upgrade
        self.created = p.SessionCreated.new()
        self.id = self.created.id
        self.state = State.UNVALIDATED
        self.session: p.SessionUpdated | None = None
        self.prompt_tokens: list[int] = []
        self._queued: list[np.ndarray] = []  # audio appended while no utterance runs
        self._utterance: Utterance | None = None
        self._utterance_task: asyncio.Task | None = None
        self._audio_arrived = asyncio.Event()
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue(OUTBOX_LIMIT + 1)  # + the closing None
        self._close_reason: tuple[int, str] | None = None  # set when the server decides to close early
        self._room = asyncio.Event()  # set by the utterance task whenever a decode took audio in
        # for the structured log line at the end
        self._opened = time.monotonic()
        self._audio_s = 0.0
        self._utterances = 0
        self._final_latencies: list[float] = []
        self._first_delta_latencies: list[float] = []
        self._finish_requested = 0.0
        self._last_audio = time.monotonic()  # arrival of the newest append (delta latency)
        self.draining = False  # the service is stopping (see drain())
        self._refused_audio = False
        self._closing = asyncio.Event()  # set once the session should close: its work is done
        self.metrics = service.metrics
        # the session's audio levelled as it arrives (see audio.Leveller), across its utterances
        self.leveller = Leveller() if service.config.stream.level_audio else None
        self.input = InputFormat("pcm16")  # the wire format of appended audio
        self._turns: collections.deque[Turn] = collections.deque()  # not yet done, oldest first
        # turn detection (server VAD): the session's audio not yet handed to a turn, from sample
        # _heard_start; the VAD's stream; the detector; where the open turn's audio has been handed
        self.turn_detection: TurnSettings | None = None
        self._heard = AudioBuffer()
        self._heard_start = 0
        self._vad_stream: VADStream | None = None
        self._vad_origin = 0  # session sample where _vad_stream started
        self._vad_fed = 0  # session samples handed to the VAD
        self._detector: TurnDetector | None = None
        self._forwarded = 0  # session sample up to which the open turn has its audio
        self._heard_arrived = asyncio.Event()
        self._detect_task: asyncio.Task | None = None

    @property
    def streaming(self) -> bool:
        """An utterance is running (counted by the service's load meter)."""
        return self.state in (State.STREAMING, State.FINISHING)

    # -- sending ----------------------------------------------------------------------------------
    def send(self, event) -> None:
        if self._close_reason is not None:
            return
        if self._outbox.qsize() >= OUTBOX_LIMIT:
            log.warning("session %s: the client does not read its events (%d waiting); closing", self.id,
                        self._outbox.qsize())
            self.metrics.slow_readers.inc()
            self._close_reason = (CLOSE_POLICY_VIOLATION, "client does not read its events")
            self._closing.set()
            return
        self._outbox.put_nowait(p.dump(event))

    # -- the dialect's hooks (vLLM's here; openai_realtime.py overrides them) ---------------------
    def created_event(self):
        return self.created

    def error_event(self, code, message: str | None = None):
        """The error event for one of protocol.py's codes."""
        return p.error_event(code, message)

    def _parse(self, message: str):
        if self.state is State.UNVALIDATED and self._upgrade is not None and '"session"' in message:
            other = self._upgrade(self, message)
            if other is not None:  # e.g. a GA client on the bare path: the session speaks GA from now on
                return other._parse(message)
        return p.parse_client_event(message)

    def _protocol_error(self, exc: p.ProtocolError):
        if exc.event_type == "input_audio_buffer.commit" and self.state is State.UNVALIDATED:
            exc = p.ProtocolError(p.MODEL_NOT_VALIDATED)  # vLLM checks the session before the fields
        return exc.to_event()

    def _wants_words(self) -> bool:
        """The session asked for word timestamps (the ``word_timestamps`` extension)."""
        return self.session is not None and self.session.word_timestamps

    def _emit_delta(self, turn: Turn, delta: str, words: list[dict] | None) -> None:
        """New committed text, and (``words`` not None: the session asked for them) the words
        completed so far that no delta carried (each a dict of ``protocol.DeltaWord``'s fields)."""
        self.send(p.TranscriptionDelta(delta=delta, words=None if words is None else [p.DeltaWord(**w) for w in words]))

    def _emit_partial(self, turn: Turn, utterance: Utterance) -> None:
        if self.session is not None and self.session.partials:  # opt-in extension ("" clears it)
            self.send(p.TranscriptionPartial(text=utterance.partial))

    def _emit_done(self, turn: Turn, utterance: Utterance) -> None:
        usage = p.Usage.from_counts(utterance.last_prompt_tokens, len(utterance.tokens))
        self.send(p.TranscriptionDone(text=utterance.text, usage=usage))

    def _emit_failed(self, turn: Turn, message: str) -> None:
        self.send(self.error_event(p.PROCESSING_ERROR, message))

    def _emit_speech_started(self, turn: Turn) -> None:
        """Turn detection heard a turn begin (vLLM's protocol has no event for it)."""

    def _emit_speech_stopped(self, turn: Turn) -> None:
        """Turn detection heard a turn end (then the turn is committed)."""

    def _emit_committed(self, turn: Turn) -> None:
        """The turn's audio is complete."""

    async def _sender(self) -> None:
        while (message := await self._outbox.get()) is not None:
            await self.ws.send(message)

    # -- life cycle -------------------------------------------------------------------------------
    async def serve(self) -> None:
        limits = self.service.config.server
        if self.service.draining.is_set() or not self.service.admits_session():
            stopping = self.service.draining.is_set()
            self.metrics.sessions_refused.labels("shutdown" if stopping else "busy").inc()
            await self.ws.accept()
            await self.ws.send(p.dump(self.error_event(p.SERVER_SHUTDOWN if stopping else p.SERVER_BUSY)))
            await self.ws.close(*((CLOSE_GOING_AWAY, "server shutting down") if stopping
                                  else (CLOSE_TRY_AGAIN_LATER, "server busy")))
            return
        self.service.sessions.add(self)
        self.metrics.sessions_opened.inc()
        sender = asyncio.create_task(self._sender())
        close = None
        try:
            self.send(self.created_event())
            close = await self._receive_loop(limits.idle_timeout_s)
        finally:
            self._close_utterance()
            if self._detect_task is not None:
                self._detect_task.cancel()
            self.service.sessions.discard(self)
            self._log_summary()
            if close is None:  # the client went away: nothing more to send
                sender.cancel()
        if close[0] == CLOSE_POLICY_VIOLATION:  # the client does not read: do not wait on it
            sender.cancel()
        else:
            self._outbox.put_nowait(None)
            await sender  # flush what is queued, then close
        await self.ws.close(*close)

    async def _receive_loop(self, idle_timeout: float) -> tuple[int, str]:
        """Handle events until the server decides to close; returns (close code, reason).

        A client disconnect cancels this task (Quart does), which ends the session.
        """
        while True:
            await self._wait_for_room()
            # while an utterance is finishing the client rightly waits for its done: no idle timeout
            timeout = None if self.state is State.FINISHING else idle_timeout
            try:
                message = await self._next_message(timeout)
            except TimeoutError:
                self.send(self.error_event(p.IDLE_TIMEOUT))
                return CLOSE_NORMAL, "idle timeout"
            if message is None:
                return self._close_reason or (CLOSE_GOING_AWAY, "server shutting down")
            if isinstance(message, bytes):
                self.send(self.error_event(p.INVALID_FRAME))
                continue
            try:
                event = self._parse(message)  # may turn this session into another dialect's (see _parse)
                self._handle(event)
            except p.ProtocolError as exc:
                self.send(self._protocol_error(exc))

    async def _wait_for_room(self) -> None:
        """Backpressure: while the running utterance holds ``max_buffer_s`` of audio not yet decoded,
        stop reading the socket until a decode takes some in.  The client's sends then wait on TCP
        flow control (the socket's messages are queued in bounded queues only, see app.py), so a
        file streamed at any speed is paced to what the engine decodes, and nothing is dropped."""
        limit = self.service.config.server.max_buffer_s * SAMPLE_RATE
        while (self.state is State.STREAMING and self._utterance is not None
               and self._utterance.pending_samples >= limit and not self._closing.is_set()):
            self._room.clear()
            room = asyncio.ensure_future(self._room.wait())
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait({room, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                room.cancel()
                closing.cancel()

    async def _next_message(self, timeout: float | None) -> str | bytes | None:
        """The next client message, or None once the session is closing (``drain``).

        ``asyncio.timeout``/``asyncio.wait``, not ``wait_for``: on Python 3.11 ``wait_for`` can
        swallow the handler's cancellation (the client's disconnect) when a message arrives at the
        same moment, leaving the session open until the idle timeout.
        """
        receive = asyncio.ensure_future(self.ws.receive())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({receive, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receive, closing):
                if not task.done():
                    task.cancel()
        return receive.result() if receive.done() and not receive.cancelled() else None

    def drain(self) -> None:
        """The service is stopping: finish the running utterance (the client gets its
        ``transcription.done``), report audio that will not be transcribed, then close (1001)."""
        if self.draining:
            return
        self.draining = True
        if self._queued:
            seconds = sum(len(a) for a in self._queued) / SAMPLE_RATE
            self._queued = []
            self.send(self.error_event(
                p.SERVER_SHUTDOWN, f"Server shutting down: {seconds:.2f} s of uncommitted audio was not transcribed."))
        open_turn = self._open_turn()
        if open_turn is not None:  # its utterance finishes (now, or after the one before it)
            if self.turn_detection is not None:
                self._forward(open_turn, self._heard_start + len(self._heard))
            self._close_turn(open_turn, flush=True)
        if self._detector is not None:  # no new turn starts
            self._drop_heard(self._heard_start + len(self._heard))
            self._detector.reset(self._heard_start)
        if self._utterance_task is None and not self._turns:
            self._closing.set()  # else the utterance's task sets it when its done is sent

    def _close_utterance(self) -> None:
        """Disconnect: free buffers and cancel pending work in the batcher at once."""
        self.service.batcher.cancel(self.id)
        if self._utterance_task is not None:
            self._utterance_task.cancel()
        self._utterance = None
        self._queued = []
        self._turns.clear()
        self._heard = AudioBuffer()

    def _log_summary(self) -> None:
        def ms(values):
            return round(1000 * float(np.median(values))) if values else None

        log.info(json.dumps({
            "event": "session_closed",
            "session": self.id,
            "seconds": round(time.monotonic() - self._opened, 2),
            "audio_s": round(self._audio_s, 2),
            "utterances": self._utterances,
            "first_delta_ms_p50": ms(self._first_delta_latencies),
            "final_latency_ms_p50": ms(self._final_latencies),
        }))

    # -- events -----------------------------------------------------------------------------------
    def _handle(self, event) -> None:
        if isinstance(event, p.InputAudioBufferAppend):
            self._append(event)
        elif isinstance(event, p.SessionUpdate):
            self._update(event)
        elif isinstance(event, p.InputAudioBufferCommit):
            self._commit(event)
        elif isinstance(event, p.InputAudioBufferClear):
            self._clear()

    def _update(self, event: p.SessionUpdate) -> None:
        if not self.service.serves(event.model):
            raise p.ProtocolError.model_not_found(event.model)
        if event.word_timestamps and not self.service.engine.word_timestamps:
            raise p.ProtocolError(p.PROCESSING_ERROR, WORDS_OFF)
        tokenizer = self.service.engine.tokenizer
        try:
            tokenizer.sot_sequence(event.language, event.task)  # validates language and task
        except ValueError as exc:
            raise p.ProtocolError(p.PROCESSING_ERROR, str(exc)) from None
        if event.prompt and len(event.prompt) > MAX_PROMPT_CHARS:
            raise p.ProtocolError(p.PROCESSING_ERROR, f"prompt: at most {MAX_PROMPT_CHARS} characters, "
                                                      f"not {len(event.prompt)}")
        self.prompt_tokens = tokenizer.encode_prompt(event.prompt)
        self.session = p.SessionUpdated.from_update(event)
        self.set_turn_detection(event.turn_detection.settings() if event.turn_detection is not None else None)
        if self.state is State.UNVALIDATED:
            self.state = State.IDLE
        self.send(self.session)

    def _append(self, event: p.InputAudioBufferAppend) -> None:
        pcm = p.decode_audio_payload(event.audio, self.service.config.server.max_message_bytes)
        self._take_audio(self.input.decode(pcm))

    def _take_audio(self, samples: np.ndarray) -> None:
        """Decoded audio (16 kHz float32) from the client: levelled, then to the turn it belongs to
        (or, with turn detection, to the VAD first)."""
        limits = self.service.config.server
        if self.draining:  # said once; later appends are dropped without another event
            if not self._refused_audio:
                self._refused_audio = True
                raise p.ProtocolError(p.SERVER_SHUTDOWN)
            return
        if (self.state is State.FINISHING and self.turn_detection is None and not self.audio_opens_turns
                and not self.service.config.stream.keep_audio_after_final):
            self._heard_start += len(samples)  # (still the session's audio: word times count it)
            return  # vLLM drops audio sent after final:true until the utterance is done
        if self.state is not State.STREAMING and self._buffered_samples() + len(samples) > limits.max_buffer_s * SAMPLE_RATE:
            # audio appended before the utterance starts (no commit yet): no decode can take it in
            # to make room, so it cannot be paced (while streaming, _wait_for_room paces the client)
            raise p.ProtocolError(p.BUFFER_FULL)
        self._audio_s += len(samples) / SAMPLE_RATE
        self._last_audio = time.monotonic()
        self.metrics.audio_seconds.labels("realtime").inc(len(samples) / SAMPLE_RATE)
        if self.leveller is not None:
            samples = self.leveller.process(samples)
        self._route(samples)

    def _route(self, samples: np.ndarray) -> None:
        if not len(samples):
            return
        if self.turn_detection is not None:
            self._heard.append(samples)
            self._heard_arrived.set()
            return
        turn = self._open_turn()
        if turn is None and self.audio_opens_turns:
            turn = self._new_turn()
        self._heard_start += len(samples)  # the session's sample count (the VAD's clock when it starts)
        if turn is not None:
            self._turn_audio(turn, samples)
        else:
            self._queued.append(samples)

    def _flush_input(self) -> np.ndarray:
        """The samples the resampler and the leveller still hold (the end of a stretch of audio)."""
        tail = self.input.flush()
        if self.leveller is not None:
            tail = np.concatenate([self.leveller.process(tail), self.leveller.flush()])
            # the next stretch is levelled afresh: an utterance's audio does not depend on the last one's
            self.leveller = Leveller()
        return tail

    def _buffered_samples(self) -> int:
        queued = sum(len(a) for a in self._queued) + sum(t.samples for t in self._turns if t.utterance is None)
        return queued + len(self._heard) + (self._utterance.pending_samples if self._utterance is not None else 0)

    def _commit(self, event: p.InputAudioBufferCommit) -> None:
        if self.state is State.UNVALIDATED:
            raise p.ProtocolError(p.MODEL_NOT_VALIDATED)
        if self.turn_detection is not None:  # the VAD opens turns; final ends the one in progress
            if event.final:
                self._end_detected_turn()
            return
        if self.draining and self.state is State.IDLE:
            raise p.ProtocolError(p.SERVER_SHUTDOWN)
        if self.state is State.IDLE:
            if event.final and not self._queued:
                return  # nothing running and nothing to transcribe: ignore, the session stays usable
            turn = self._new_turn(self._queued)
            self._queued = []
            turn.announced = True
        if event.final and self.state is State.STREAMING:
            self._close_turn(self._open_turn(), flush=True)

    def _clear(self) -> None:
        if self.turn_detection is not None or self.audio_opens_turns:
            self._clear_buffer()
            return
        self._queued = []
        if self.leveller is not None:
            self.leveller.flush()  # the few samples it holds are cleared too
        self.input.flush()
        if self._utterance is not None and self.state is State.STREAMING:
            dropped = self._utterance.drop_pending()
            if dropped:  # later audio of the utterance lies that much further on the session's clock
                turn = next(t for t in self._turns if t.utterance is self._utterance)
                turn.gaps.append((self._utterance.received_samples, dropped))

    def _clear_buffer(self) -> None:
        """OpenAI's ``input_audio_buffer.clear``: the audio not committed yet is dropped, the open
        turn with it (and the VAD's turn in progress)."""
        self._queued = []
        self._flush_input()
        turn = self._open_turn()
        if turn is not None:
            self._discard_turn(turn)
        end = self._heard_start + len(self._heard)
        self._heard, self._heard_start = AudioBuffer(), end
        if self._detector is not None:
            self._detector.reset(end)
            self._vad_stream, self._vad_origin, self._vad_fed = VADStream(), end, end  # frames start afresh

    # -- turns ------------------------------------------------------------------------------------
    def _open_turn(self) -> Turn | None:
        """The newest turn, if it still takes audio."""
        return self._turns[-1] if self._turns and not self._turns[-1].closed else None

    def _session_samples(self) -> int:
        """The session's audio so far, in samples (the clock of turns and word timestamps)."""
        return self._heard_start + len(self._heard)

    def _new_turn(self, chunks=(), **fields) -> Turn:
        """Open a turn (its utterance starts now, or when the one before it is done); ``chunks``:
        its first audio, the session's latest."""
        fields.setdefault("start_sample", self._session_samples() - sum(len(chunk) for chunk in chunks))
        turn = Turn(**fields)
        self._turns.append(turn)
        for chunk in chunks:
            self._turn_audio(turn, chunk)
        if self.state is State.IDLE:
            self._start_turn(turn)
        return turn

    def _turn_audio(self, turn: Turn, samples: np.ndarray) -> None:
        if not len(samples):
            return
        turn.samples += len(samples)
        if turn.utterance is not None and turn.utterance is self._utterance and self.state is State.STREAMING:
            self._utterance.add_audio(samples)
            self._audio_arrived.set()
        else:
            turn.chunks.append(samples)

    def _close_turn(self, turn: Turn, flush: bool = False) -> None:
        """The turn's audio is complete; ``flush``: with what the resampler and leveller hold."""
        if flush:
            tail = self._flush_input()
            if self.turn_detection is None:
                self._heard_start += len(tail)
            self._turn_audio(turn, tail)
        turn.closed = True
        self._emit_committed(turn)
        if turn.utterance is not None and turn.utterance is self._utterance and self.state is State.STREAMING:
            self._finish()

    def _discard_turn(self, turn: Turn) -> None:
        """Drop a turn that is not closed (``clear``): its utterance stops, nothing is sent for it."""
        self._turns.remove(turn)
        if turn.utterance is not None and turn.utterance is self._utterance:
            task = self._utterance_task
            self._utterance, self._utterance_task = None, None
            self.state = State.IDLE
            self.service.batcher.cancel(self.id)
            if task is not None:
                task.cancel()
            self.service.note_streaming()
            self._room.set()
            self._start_next_turn()

    def _start_next_turn(self) -> None:
        if self.state is State.IDLE and self._turns and self._turns[0].utterance is None:
            self._start_turn(self._turns[0])

    # -- turn detection (server VAD) -----------------------------------------------------------
    def set_turn_detection(self, settings: TurnSettings | None) -> None:
        """Turn detection on (``settings``), changed, or off (None: turns are the client's commits)."""
        if settings == self.turn_detection:
            return
        if settings is None:
            turn = self._open_turn()
            if turn is not None and self._detector is not None and self._detector.speaking:
                self._end_detected_turn()
            rest = self._heard.slice(0, len(self._heard))  # heard since the last turn, or not yet judged
            self._heard_start += len(self._heard)
            self._heard = AudioBuffer()
            self.turn_detection, self._detector = None, None
            if self._detect_task is not None:
                self._detect_task.cancel()
                self._detect_task = None
            if len(rest) and self.audio_opens_turns and self._open_turn() is not None:
                self._turn_audio(self._open_turn(), rest)
            elif len(rest) and self.audio_opens_turns:
                self._new_turn([rest])
            elif len(rest):
                self._queued.append(rest)
            return
        speaking = self._detector.speaking if self._detector is not None else False
        self.turn_detection = settings
        end = self._heard_start + len(self._heard)
        if self._detector is None:  # audio queued for a commit goes to the VAD now
            queued, self._queued = self._queued, []
            open_turn = self._open_turn()
            if open_turn is not None and open_turn.utterance is None:  # not started: its audio is heard again
                self._turns.remove(open_turn)
                queued = open_turn.chunks + queued
            elif open_turn is not None:
                self._close_turn(open_turn, flush=True)
            start = end - sum(len(chunk) for chunk in queued)  # the queued audio is the session's latest
            self._heard, self._heard_start = AudioBuffer(), start
            self._vad_stream, self._vad_origin, self._vad_fed = VADStream(), start, start
            self._forwarded = start
            for chunk in queued:
                self._heard.append(chunk)
            self._heard_arrived.set()
        self._detector = TurnDetector(settings)
        self._detector.reset(self._heard_start)
        self._detector.speaking = speaking
        if self._detect_task is None:
            self._detect_task = asyncio.create_task(self._detect())

    async def _detect(self) -> None:
        """Feed the session's audio to the VAD as it arrives (batched with every other session's,
        off the event loop) and open and close turns where it hears speech start and stop."""
        vad = turn_vad(self.service)
        try:
            while True:
                await self._heard_arrived.wait()
                self._heard_arrived.clear()
                end = self._heard_start + len(self._heard)
                if end <= self._vad_fed:
                    continue
                stream, origin = self._vad_stream, self._vad_origin
                new = self._heard.slice(self._vad_fed - self._heard_start, len(self._heard))
                self._vad_fed = end
                first, probs = await vad.feed(stream, new)
                if stream is not self._vad_stream or self._detector is None:
                    continue  # cleared (or turned off) meanwhile: these frames are of dropped audio
                self._on_frames(origin + first, probs)
        except asyncio.CancelledError:
            raise
        except Exception:  # the VAD failed: the session goes on with the client's commits
            log.exception("session %s: turn detection failed", self.id)
            self.send(self.error_event(p.PROCESSING_ERROR, "Turn detection failed; commit turns by hand."))
            self.turn_detection, self._detector, self._detect_task = None, None, None

    def _on_frames(self, start: int, probs: np.ndarray) -> None:
        detector = self._detector
        judged = start + len(probs) * FRAME  # the VAD has spoken on the session's audio up to here
        for kind, sample in detector.frames(start, probs):
            if kind == "start":
                if self.draining:
                    detector.reset(judged)
                    break
                sample = max(sample, self._heard_start)
                self._forwarded = sample
                turn = self._new_turn(start_sample=sample, announced=True)
                self._emit_speech_started(turn)
            else:
                turn = self._open_turn()
                if turn is None:
                    continue
                self._forward(turn, sample)
                turn.end_sample = sample
                self._emit_speech_stopped(turn)
                self._close_turn(turn)
        turn = self._open_turn()
        if detector.speaking and turn is not None:
            self._forward(turn, judged)
        else:  # keep what a turn starting at the next frame takes as its prefix
            keep = max(detector.floor, judged - detector.settings.prefix_samples)
            self._drop_heard(keep)

    def _forward(self, turn: Turn, until: int) -> None:
        """Hand the session's audio up to sample ``until`` to ``turn``."""
        a = max(self._forwarded, self._heard_start)
        if until > a:
            self._turn_audio(turn, self._heard.slice(a - self._heard_start, until - self._heard_start))
            self._forwarded = until
        self._drop_heard(until)

    def _drop_heard(self, until: int) -> None:
        n = min(until - self._heard_start, len(self._heard))
        if n > 0:
            self._heard.drop_front(n)
            self._heard_start += n

    def _end_detected_turn(self, min_samples: int = 0) -> Turn | None:
        """The client commits while turns are detected: the turn in progress ends with all audio
        received (or, with none in progress, the audio heard since the last turn is one);
        returns the closed turn, or None when it would hold less than ``min_samples``."""
        end = self._heard_start + len(self._heard)
        turn = self._open_turn()
        if turn is None:
            start = max(self._detector.floor, self._heard_start)
            if end - start < max(1, min_samples):
                return None
            self._forwarded = start
            turn = self._new_turn(start_sample=start)
        elif turn.samples + end - max(self._forwarded, self._heard_start) < min_samples:
            return None
        self._forward(turn, end)
        turn.end_sample = end
        self._detector.reset(end)
        self._close_turn(turn, flush=False)
        return turn

    def _finish(self) -> None:
        """The utterance's audio is complete (``final: true``, a commit, the end of a turn, or the
        service is draining)."""
        self.state = State.FINISHING
        self._finish_requested = time.monotonic()
        self._utterance.finish()
        self._audio_arrived.set()

    # -- the utterance ----------------------------------------------------------------------------
    async def _next_tick(self, utterance: Utterance) -> None:
        """Wait for the next tick of a clock shared by every session (one tick per ``step_s``).

        Sessions that step on the same tick submit together, so the batcher decodes them in one
        batch instead of one after another; a session waits at most one step for its tick, and
        not at all once ``final`` arrives (the finishing decode goes at once).
        """
        step = self.service.config.stream.step_s
        deadline = time.monotonic() + (-time.monotonic()) % step
        while not utterance.finishing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._audio_arrived.clear()  # set again by an append, a final commit or a drain
            try:
                async with asyncio.timeout(remaining):
                    await self._audio_arrived.wait()
            except TimeoutError:
                return

    async def _submit(self, request: DecodeRequest):
        """The batcher's result for ``request``; a full queue is waited out, never a lost utterance
        (the session's audio keeps arriving meanwhile, paced by _wait_for_room)."""
        while True:
            try:
                return await self.service.batcher.submit(self.id, request)
            except Busy:
                await asyncio.sleep(BUSY_RETRY_S)

    def _report_stretches(self, utterance: Utterance, seen: int) -> int:
        """Log and count every stretch of audio that left the utterance's window without text."""
        for stretch in utterance.stretches[seen:]:
            if stretch.tokens == 0 and stretch.seconds > 0:
                self.metrics.untranscribed_seconds.labels(stretch.reason).inc(stretch.seconds)
                log.info(json.dumps({"event": "no_text", "session": self.id, "start_s": round(stretch.start_s, 2),
                                     "seconds": round(stretch.seconds, 2), "reason": stretch.reason}))
        return len(utterance.stretches)

    def _start_turn(self, turn: Turn) -> None:
        engine = self.service.engine
        utterance = Utterance(self.service.config.stream, engine.tokenizer, self.prompt_tokens,
                              word_timestamps=self._wants_words())
        for chunk in turn.chunks:
            utterance.add_audio(chunk)
        turn.chunks = []
        turn.utterance = utterance
        self._utterance = utterance
        self.state = State.STREAMING
        self._utterances += 1
        self._utterance_task = asyncio.create_task(self._drive(turn))
        self.service.note_streaming()
        if turn.closed:
            self._finish()

    def _decoding(self) -> tuple[str | None, str]:
        """The session's (language, task) for the next utterance."""
        return self.session.language, self.session.task

    async def _words(self, turn: Turn, language: str | None, task: str) -> list[dict] | None:
        """The word timestamps extension: the committed words not sent yet (see
        ``streaming.CommittedWords``), aligned by the engine in the audio they were committed from,
        in seconds of the session's audio; None when the utterance has no word timestamps.
        ``language``: the session's, else the one the decodes detected (alignment needs one)."""
        words = turn.utterance.words
        if words is None:
            return None
        jobs = words.jobs()
        if not jobs:
            return []
        aligned = await self.service.batcher.align([AlignRequest(job.audio, job.tokens, language, task)
                                                    for job in jobs])
        return [{"word": w.word.strip(), "start": turn.session_seconds(w.start), "end": turn.session_seconds(w.end),
                 "probability": round(w.probability, 4)} for w in words.take(jobs, aligned)]

    async def _send_words(self, turn: Turn, language: str | None, task: str) -> None:
        """Words whose text left the window without a decode (silence the VAD heard, the end of an
        utterance in silence): a delta with words only."""
        if words := await self._words(turn, language, task):
            self._emit_delta(turn, "", words)

    async def _drive(self, turn: Turn) -> None:
        utterance = turn.utterance
        session_language, task = self._decoding()
        language = session_language  # else the language the decodes detect (word alignment needs one)
        started = time.monotonic()
        first_delta = True
        reported = 0  # utterance.stretches already looked at
        try:
            # Steps are taken on a clock shared by all sessions (see _next_tick) once a quarter
            # step of new audio is there; a finishing utterance is decoded at once.
            min_new = self.service.config.stream.step_s / 4
            hearing = _Hearing(self.service.vad, utterance) if self.service.vad is not None else None
            while not utterance.done:
                if hearing is not None:
                    await hearing.listen()
                if not utterance.wants_decode(min_new):
                    # silence may just have left the window without a decode: that makes room too,
                    # and the reader (_wait_for_room) must hear of it or it never reads again
                    self._audio_arrived.clear()  # before any await: audio (or final) may come meanwhile
                    self._room.set()
                    await self._send_words(turn, language, task)  # text that left the window with it
                    if not utterance.done:  # (else it ended in silence, without a decode)
                        await self._audio_arrived.wait()
                    continue
                if not utterance.finishing:
                    await self._next_tick(utterance)
                    if hearing is not None:
                        await hearing.listen()
                    if not utterance.wants_decode(min_new):
                        self._room.set()
                        await self._send_words(turn, language, task)
                        continue
                window = utterance.next_window()
                request = DecodeRequest(window.audio, session_language, task, timestamps=True,
                                        prompt=window.prompt, prefix=window.prefix,
                                        max_new_tokens=window.max_new_tokens, temperature=window.temperature)
                newest_audio = self._last_audio  # the window holds everything appended until now
                result = await self._submit(request)
                self._room.set()
                delta = utterance.apply(window, result)
                reported = self._report_stretches(utterance, reported)
                words = None
                if utterance.words is not None:
                    language = language or result.language  # what the decode detected, for word alignment
                    words = await self._words(turn, language, task)
                if delta:
                    now = time.monotonic()
                    if first_delta:
                        self._first_delta_latencies.append(now - started)
                        self.metrics.first_delta.observe(now - started)
                        first_delta = False
                    self.metrics.delta_latency.observe(now - newest_audio)
                if delta or words:
                    self._emit_delta(turn, delta, words)
                self._emit_partial(turn, utterance)
            self._emit_done(turn, utterance)
            final_latency = time.monotonic() - self._finish_requested
            self._final_latencies.append(final_latency)
            self.metrics.final_latency.observe(final_latency)
            self.metrics.utterances.labels("done").inc()
        except (EngineError, ValueError) as exc:  # the engine could not decode it
            log.warning("session %s: utterance failed: %s", self.id, exc)
            self._emit_failed(turn, str(exc))
            self.metrics.utterances.labels("failed").inc()
        except asyncio.CancelledError:  # the client went away (or cleared the turn)
            self.metrics.utterances.labels("cancelled").inc()
            raise
        except Exception as exc:  # a bug: answered all the same (the error replaces the done), and logged
            log.exception("session %s: utterance failed unexpectedly", self.id)
            self._emit_failed(turn, f"Internal error: {type(exc).__name__}")
            self.metrics.utterances.labels("failed").inc()
        finally:
            if self._utterance is utterance:
                self._utterance = None
                self._utterance_task = None
                if self.state in (State.STREAMING, State.FINISHING):
                    self.state = State.IDLE
                if self._turns and self._turns[0] is turn:
                    self._turns.popleft()
                self._start_next_turn()  # a turn that opened meanwhile (while draining: only a closed one is left)
            self._room.set()
            self.service.note_streaming()
            if self.draining and self._utterance_task is None:
                self._closing.set()


class _Hearing:
    """Feeds an utterance's new audio to the service's VAD (batched across sessions, off the event
    loop) and marks what it hears as speech or not (see Utterance.mark_speech)."""

    def __init__(self, vad, utterance: Utterance):
        self.vad, self.utterance = vad, utterance
        self.stream = VADStream()
        self.origin = 0  # utterance sample of the stream's first sample

    async def listen(self) -> None:
        start, samples = self.utterance.vad_input()
        if not len(samples):
            return
        if start != self.origin + self.stream.consumed + len(self.stream.carry):  # the window moved past it
            self.stream, self.origin = VADStream(), start
        first, probs = await self.vad.feed(self.stream, samples)
        self.utterance.mark_speech(self.origin + first, FRAME, probs >= THRESHOLD)
