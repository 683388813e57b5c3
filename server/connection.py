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
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time

import numpy as np

from jax_realtime.audio import SAMPLE_RATE, Leveller, pcm16_to_float32
from jax_realtime.batcher import Busy, EngineError
from jax_realtime.engine import AlignRequest, DecodeRequest
from jax_realtime.streaming import Utterance
from jax_realtime.tokenizer import MAX_PROMPT_CHARS
from jax_realtime.vad import FRAME, THRESHOLD, VADStream

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


class State(enum.Enum):
    UNVALIDATED = "unvalidated"
    IDLE = "idle"
    STREAMING = "streaming"
    FINISHING = "finishing"


class RealtimeConnection:
    def __init__(self, websocket, service: Service):
        self.ws = websocket
        self.service = service
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
        # the session's audio timeline in samples (kept, levelled, cleared or dropped alike): word
        # timestamps are stream times from the session's first sample
        self._timeline = 0
        self._utterance_offset = 0.0  # the running utterance's first sample on it, in seconds
        self.draining = False  # the service is stopping (see drain())
        self._refused_audio = False
        self._closing = asyncio.Event()  # set once the session should close: its work is done
        self.metrics = service.metrics
        # the session's audio levelled as it arrives (see audio.Leveller), across its utterances
        self.leveller = Leveller() if service.config.stream.level_audio else None

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
            await self.ws.send(p.dump(p.error_event(p.SERVER_SHUTDOWN if stopping else p.SERVER_BUSY)))
            await self.ws.close(*((CLOSE_GOING_AWAY, "server shutting down") if stopping
                                  else (CLOSE_TRY_AGAIN_LATER, "server busy")))
            return
        self.service.sessions.add(self)
        self.metrics.sessions_opened.inc()
        sender = asyncio.create_task(self._sender())
        close = None
        try:
            self.send(self.created)
            close = await self._receive_loop(limits.idle_timeout_s)
        finally:
            self._close_utterance()
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
                self.send(p.error_event(p.IDLE_TIMEOUT))
                return CLOSE_NORMAL, "idle timeout"
            if message is None:
                return self._close_reason or (CLOSE_GOING_AWAY, "server shutting down")
            if isinstance(message, bytes):
                self.send(p.error_event(p.INVALID_FRAME))
                continue
            try:
                self._handle(p.parse_client_event(message))
            except p.ProtocolError as exc:
                if exc.event_type == "input_audio_buffer.commit" and self.state is State.UNVALIDATED:
                    exc = p.ProtocolError(p.MODEL_NOT_VALIDATED)  # vLLM checks the session before the fields
                self.send(exc.to_event())

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
            self.send(p.error_event(p.SERVER_SHUTDOWN,
                                    f"Server shutting down: {seconds:.2f} s of uncommitted audio was not transcribed."))
        if self.state is State.STREAMING:
            self._finish()
        if self._utterance_task is None:
            self._closing.set()  # else the utterance's task sets it when its done is sent

    def _close_utterance(self) -> None:
        """Disconnect: free buffers and cancel pending work in the batcher at once."""
        self.service.batcher.cancel(self.id)
        if self._utterance_task is not None:
            self._utterance_task.cancel()
        self._utterance = None
        self._queued = []

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
        tokenizer = self.service.engine.tokenizer
        try:
            tokenizer.sot_sequence(event.language, event.task)  # validates language and task
        except ValueError as exc:
            raise p.ProtocolError(p.PROCESSING_ERROR, str(exc)) from None
        if event.word_timestamps and not self.service.engine.word_timestamps:
            raise p.ProtocolError(p.PROCESSING_ERROR, "word_timestamps: word-level timestamps are not enabled on this "
                                                      "server (start it with --word-timestamps or [engine] "
                                                      "word_timestamps = true)")
        if event.prompt and len(event.prompt) > MAX_PROMPT_CHARS:
            raise p.ProtocolError(p.PROCESSING_ERROR, f"prompt: at most {MAX_PROMPT_CHARS} characters, "
                                                      f"not {len(event.prompt)}")
        self.prompt_tokens = tokenizer.encode(" " + event.prompt.strip()) if event.prompt else []
        self.session = p.SessionUpdated.from_update(event)
        if self.state is State.UNVALIDATED:
            self.state = State.IDLE
        self.send(self.session)

    def _append(self, event: p.InputAudioBufferAppend) -> None:
        limits = self.service.config.server
        pcm = p.decode_audio_payload(event.audio, limits.max_message_bytes)
        samples = pcm16_to_float32(pcm)
        if self.draining:  # said once; later appends are dropped without another event
            if not self._refused_audio:
                self._refused_audio = True
                raise p.ProtocolError(p.SERVER_SHUTDOWN)
            return
        if self.state is State.FINISHING and not self.service.config.stream.keep_audio_after_final:
            self._timeline += len(samples)
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
        self._timeline += len(samples)
        if self.state is State.STREAMING:
            self._utterance.add_audio(samples)
            self._audio_arrived.set()
        else:
            self._queued.append(samples)

    def _buffered_samples(self) -> int:
        queued = sum(len(a) for a in self._queued)
        return queued + (self._utterance.pending_samples if self._utterance is not None else 0)

    def _commit(self, event: p.InputAudioBufferCommit) -> None:
        if self.state is State.UNVALIDATED:
            raise p.ProtocolError(p.MODEL_NOT_VALIDATED)
        if self.draining and self.state is State.IDLE:
            raise p.ProtocolError(p.SERVER_SHUTDOWN)
        if self.state is State.IDLE:
            if event.final and not self._queued:
                return  # nothing running and nothing to transcribe: ignore, the session stays usable
            self._start_utterance()
        if event.final and self.state is State.STREAMING:
            self._finish()

    def _finish(self) -> None:
        """The utterance's audio is complete (``final: true``, or the service is draining)."""
        self.state = State.FINISHING
        self._finish_requested = time.monotonic()
        if self.leveller is not None:
            rest = self.leveller.flush()
            self._timeline += len(rest)
            self._utterance.add_audio(rest)
        self._utterance.finish()
        self._audio_arrived.set()

    def _clear(self) -> None:
        self._queued = []
        if self.leveller is not None:
            self._timeline += len(self.leveller.flush())  # the few samples it holds are cleared too
        if self._utterance is not None and self.state is State.STREAMING:
            self._utterance.drop_pending()

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

    def _start_utterance(self) -> None:
        engine = self.service.engine
        utterance = Utterance(self.service.config.stream, engine.tokenizer, self.prompt_tokens,
                              word_timestamps=self.session.word_timestamps)
        # the utterance's first sample on the session's timeline (the queued audio is its start)
        self._utterance_offset = (self._timeline - sum(len(chunk) for chunk in self._queued)) / SAMPLE_RATE
        for chunk in self._queued:
            utterance.add_audio(chunk)
        self._queued = []
        self._utterance = utterance
        self.state = State.STREAMING
        self._utterances += 1
        self._utterance_task = asyncio.create_task(self._drive(utterance))
        self.service.note_streaming()

    async def _words(self, utterance: Utterance, offset: float, session: p.SessionUpdated,
                     language: str | None) -> list[p.DeltaWord]:
        """The ``word_timestamps`` extension: the committed words not sent yet (see
        ``CommittedWords``), aligned by the engine in the audio they were committed from, as stream
        times (``offset``: the utterance's start on the session's timeline; ``language``: the
        session's, else the one the decode detected)."""
        jobs = utterance.words.jobs()
        if not jobs:
            return []
        aligned = await self.service.batcher.align(
            [AlignRequest(job.audio, job.tokens, language, session.task) for job in jobs])
        return [p.DeltaWord(word=w.word.strip(), start=round(offset + w.start, 2), end=round(offset + w.end, 2),
                            probability=round(w.probability, 4)) for w in utterance.words.take(jobs, aligned)]

    async def _drive(self, utterance: Utterance) -> None:
        session = self.session
        offset = self._utterance_offset
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
                    self._room.set()
                    if utterance.done:  # it ended in silence, without a decode
                        continue
                    self._audio_arrived.clear()
                    await self._audio_arrived.wait()
                    continue
                if not utterance.finishing:
                    await self._next_tick(utterance)
                    if hearing is not None:
                        await hearing.listen()
                    if not utterance.wants_decode(min_new):
                        self._room.set()
                        continue
                window = utterance.next_window()
                request = DecodeRequest(window.audio, session.language, session.task, timestamps=True,
                                        prompt=window.prompt, prefix=window.prefix,
                                        max_new_tokens=window.max_new_tokens, temperature=window.temperature)
                newest_audio = self._last_audio  # the window holds everything appended until now
                result = await self._submit(request)
                self._room.set()
                delta = utterance.apply(window, result)
                reported = self._report_stretches(utterance, reported)
                words = None
                if utterance.words is not None:
                    words = await self._words(utterance, offset, session, session.language or result.language)
                if delta:
                    now = time.monotonic()
                    if first_delta:
                        self._first_delta_latencies.append(now - started)
                        self.metrics.first_delta.observe(now - started)
                        first_delta = False
                    self.metrics.delta_latency.observe(now - newest_audio)
                if delta or words:
                    self.send(p.TranscriptionDelta(delta=delta, words=words))
                if session.partials:  # opt-in extension; sent after every step ("" clears it)
                    self.send(p.TranscriptionPartial(text=utterance.partial))
            usage = p.Usage.from_counts(utterance.last_prompt_tokens, len(utterance.tokens))
            self.send(p.TranscriptionDone(text=utterance.text, usage=usage))
            final_latency = time.monotonic() - self._finish_requested
            self._final_latencies.append(final_latency)
            self.metrics.final_latency.observe(final_latency)
            self.metrics.utterances.labels("done").inc()
        except (EngineError, ValueError) as exc:  # the engine could not decode it
            log.warning("session %s: utterance failed: %s", self.id, exc)
            self.send(p.error_event(p.PROCESSING_ERROR, str(exc)))
            self.metrics.utterances.labels("failed").inc()
        except asyncio.CancelledError:  # the client went away
            self.metrics.utterances.labels("cancelled").inc()
            raise
        except Exception as exc:  # a bug: answered all the same (the error replaces the done), and logged
            log.exception("session %s: utterance failed unexpectedly", self.id)
            self.send(p.error_event(p.PROCESSING_ERROR, f"Internal error: {type(exc).__name__}"))
            self.metrics.utterances.labels("failed").inc()
        finally:
            if self._utterance is utterance:
                self._utterance = None
                self._utterance_task = None
                if self.state in (State.STREAMING, State.FINISHING):
                    self.state = State.IDLE
            self._room.set()
            self.service.note_streaming()
            if self.draining:
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
