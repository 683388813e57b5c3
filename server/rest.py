"""HTTP routes: OpenAI-compatible transcription and translation, models, health and metrics.

``POST /v1/audio/transcriptions`` and ``POST /v1/audio/translations`` take OpenAI's multipart form
and transcribe the whole file with Whisper's long-form seek loop (``transcribe_async``) through
the service's one batcher, the same one the realtime sessions use.  Decisions:

* ``temperature``: 0 (the default) is OpenAI's "0 = automatic": greedy, and a window whose output
  is repetitive or unlikely is decoded again at 0.2, 0.4, ... 1.0 (Whisper's fallback).  A value in
  (0, 1] samples at that one temperature, no fallback (vLLM's behaviour).
* Every response format comes from the same decode (timestamp mode): ``text``, ``json``, ``srt``,
  ``vtt`` and ``verbose_json`` of one file always carry the same text.
* ``timestamp_granularities[]``: ``segment`` (segments are always in ``verbose_json``) and ``word``:
  ``verbose_json`` then has OpenAI's top-level ``words`` (``word``, ``start``, ``end``, plus
  ``probability``), and each segment starts at its first word and ends at its last.  ``word`` needs
  ``response_format=verbose_json`` (as OpenAI's API) and an engine compiled with word timestamps
  (``[engine] word_timestamps = true`` or ``serve --word-timestamps``); otherwise a 400.
* ``stream=true`` (``response_format`` json or text): server-sent events as each 30 s window is
  decoded.  OpenAI's shape by default: ``transcript.text.delta`` events (``delta``), then one
  ``transcript.text.done`` (``text``, ``usage`` in tokens), no ``[DONE]``.  vLLM's shape with the form
  field ``stream_format=vllm`` (or ``[server] rest_stream_format = "vllm"``): one
  ``transcription.chunk`` per window, a last chunk with ``finish_reason: "stop"``, a usage chunk
  with ``stream_include_usage=true``, then ``data: [DONE]``.  An error after the stream started is
  sent as ``data: {"error": {...}}`` (the SDKs raise it), then the stream ends (vLLM: ``[DONE]``).
* ``model`` may be omitted (the first served name); ``language`` None: English on English-only
  models, detected on multilingual ones; translations take ``language`` as the source's hint.
* Limits: the body over ``max_upload_mb`` is a 400; so is audio that decodes to more than
  ``max_audio_s`` (the decoding stops there) and a ``prompt`` over ``MAX_PROMPT_CHARS``.  At most
  ``max_concurrent_requests`` audio requests are in progress at once, from the parsed upload
  (decoding included) to the last byte of the answer; one more is answered 503 with Retry-After
  at once (it does not wait: a slot may stay taken for minutes by a long file, and the OpenAI
  SDKs retry a 503 after Retry-After).  A request that takes longer than ``request_timeout_s``
  from arrival (upload included) is a 504 (408 while the upload is still arriving), and its
  windows are dropped from the batcher.  A client that disconnects cancels its work the same way.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
import weakref
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Blueprint, Response, current_app, g, request

from jax_realtime.audio import SAMPLE_RATE, AudioError, AudioTooLong, decode_audio
from jax_realtime.batcher import Busy, EngineError
from jax_realtime.formats import render
from jax_realtime.tokenizer import LANGUAGES, MAX_PROMPT_CHARS
from jax_realtime.longform import TranscribeOptions, Transcript
from jax_realtime.transcribe import transcribe_async

from .errors import BAD_AUDIO, APIError
from .metrics import CONTENT_TYPE_LATEST
from .service import LIFECYCLE, service_of

log = logging.getLogger("jax_realtime.rest")

rest = Blueprint("rest", __name__)

AUDIO_ENDPOINTS = {"/v1/audio/transcriptions": "transcriptions", "/v1/audio/translations": "translations"}
PLAIN_TYPES = {"text": "text/plain; charset=utf-8", "srt": "text/plain; charset=utf-8",
               "vtt": "text/vtt; charset=utf-8"}
STREAMABLE = ("json", "text")
FALLBACK_TEMPERATURES = TranscribeOptions().temperatures  # (0.0, 0.2, ..., 1.0)
_LANGUAGE_CODES = {name: code for code, name in LANGUAGES.items()}  # "german" -> "de"


class AudioForm(BaseModel):
    """The form fields besides ``file`` (unknown fields are ignored, as OpenAI's SDK may send more)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    timestamp_granularities: tuple[Literal["segment", "word"], ...] = ("segment",)
    stream: bool = False
    stream_include_usage: bool = False
    stream_format: Literal["openai", "vllm"] | None = None  # None: [server] rest_stream_format

    def temperatures(self) -> tuple[float, ...]:
        return FALLBACK_TEMPERATURES if self.temperature == 0 else (self.temperature,)

    @property
    def words(self) -> bool:
        return "word" in self.timestamp_granularities


def parse_form(form) -> AudioForm:
    """Validate the multipart fields; a bad one is a 400 naming it."""
    fields = {name: form.get(name) for name in AudioForm.model_fields if name != "timestamp_granularities"}
    fields = {k: v for k, v in fields.items() if v not in (None, "")}
    if len(fields.get("prompt") or "") > MAX_PROMPT_CHARS:
        raise APIError(400, f"prompt: {len(fields['prompt'])} characters is over this server's limit of "
                            f"{MAX_PROMPT_CHARS} (Whisper uses only the last 223 tokens of a prompt).", "prompt")
    granularities = [v for key in ("timestamp_granularities[]", "timestamp_granularities")
                     for v in form.getlist(key) if v != ""]
    if granularities:
        fields["timestamp_granularities"] = granularities
    try:
        parsed = AudioForm.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = str(err["loc"][0]) if err["loc"] else None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None
    if parsed.stream and parsed.response_format not in STREAMABLE:
        raise APIError(400, f"stream=true supports response_format {' or '.join(STREAMABLE)}, "
                            f"not '{parsed.response_format}'.", "response_format")
    if parsed.words and parsed.response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities[]=word needs response_format 'verbose_json'.",
                       "timestamp_granularities")
    return parsed


def _service():
    return service_of(current_app)


def _metrics():
    return current_app.extensions["jax_realtime_metrics"]


# -- timing and metrics of the audio endpoints -------------------------------------------------------

@rest.before_app_request
async def _started() -> None:
    g.arrived = time.monotonic()


@rest.after_app_request
async def _count(response: Response) -> Response:
    endpoint = AUDIO_ENDPOINTS.get(request.path)
    if endpoint is not None:
        metrics = _metrics()
        metrics.http_requests.labels(endpoint, str(response.status_code)).inc()
        metrics.http_duration.labels(endpoint).observe(time.monotonic() - g.get("arrived", time.monotonic()))
    return response


# -- transcription and translation -------------------------------------------------------------------

@rest.post("/v1/audio/transcriptions")
async def transcriptions():
    return await _audio("transcribe")


@rest.post("/v1/audio/translations")
async def translations():
    return await _audio("translate")


async def _audio(task: str):
    service = _service()
    if service.draining.is_set():
        raise APIError(503, "The server is shutting down.", None)
    limits = service.config.server
    deadline = g.arrived + limits.request_timeout_s
    if request.mimetype != "multipart/form-data":
        raise APIError(400, "Expected a multipart/form-data body with the audio in a 'file' part.", "file")
    # the upload: bounded by Quart's BODY_TIMEOUT (408) and MAX_CONTENT_LENGTH (400), see create_app
    form = parse_form(await request.form)
    model = form.model or service.model_names[0]
    if not service.serves(model):
        raise APIError(404, f"The model `{model}` does not exist.", "model")
    options = _options(service, form, task)
    upload = (await request.files).get("file")
    if upload is None:
        raise APIError(400, "Missing required parameter: 'file'.", "file")
    slot = _Slot(service)  # from here on the request decodes and holds audio: 503 past the bound
    try:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                audio = await _decode(upload, limits.max_audio_s)
        except TimeoutError:
            raise _timeout(limits.request_timeout_s) from None
        _metrics().audio_seconds.labels("rest").inc(len(audio) / SAMPLE_RATE)
        owner = f"rest-{secrets.token_hex(8)}"
        submit = functools.partial(service.batcher.submit, owner, priority=1)  # realtime steps go first
        if form.stream:  # the slot goes with the stream: released when it ends
            response = _stream(service, submit, owner, audio, options, form, model, task, deadline, slot)
            slot = None
            return response
        try:
            service.requests_in_flight += 1  # a drain waits for it
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                transcript = await transcribe_async(submit, service.engine, audio, options)
        except TimeoutError:
            raise _timeout(limits.request_timeout_s) from None
        except DECODE_ERRORS as exc:
            raise _engine_error(exc) from None
        finally:
            service.requests_in_flight -= 1
            service.batcher.cancel(owner)  # anything still waiting (a timeout, a disconnect)
    finally:
        if slot is not None:
            slot.release()
    body = render(transcript, form.response_format, task)
    mimetype = PLAIN_TYPES.get(form.response_format)
    if mimetype is None:
        return Response(body, mimetype="application/json")
    return Response(body, content_type=mimetype)


def _options(service, form: AudioForm, task: str) -> TranscribeOptions:
    """The decoding options; language and task are checked against the model now (a 400)."""
    engine = service.engine
    if task == "translate" and not engine.dims.multilingual:
        raise APIError(400, f"The model `{engine.name}` is English-only and cannot translate; "
                            "translations need a multilingual model.", "model")
    language = form.language
    if language is not None:  # "DE", "German" -> "de": the code is what verbose_json reports back
        language = language.strip().lower()
        language = _LANGUAGE_CODES.get(language, language)
    try:
        engine.tokenizer.sot_sequence(language, task)
    except ValueError as exc:  # "language 'de' is not supported by an English-only model"
        message = str(exc)
        raise APIError(400, message[:1].upper() + message[1:] + ".", "language") from None
    if form.words and not engine.word_timestamps:
        raise APIError(400, "Word-level timestamps are not enabled on this server (start it with --word-timestamps "
                            "or [engine] word_timestamps = true).", "timestamp_granularities")
    return TranscribeOptions(language=language, task=task, timestamps=True, initial_prompt=form.prompt,
                             temperatures=form.temperatures(), word_timestamps=form.words)


class _Slot:
    """One of the ``max_concurrent_requests`` REST audio requests in progress (``service.rest_active``).

    Taken when the upload has been parsed and checked, released once: when the answer is complete,
    or, for a stream, when the stream ends -- or when the stream is dropped unstarted (a client that
    went away): ``weakref.finalize`` on the stream's generator is the backstop."""

    def __init__(self, service) -> None:
        limit = service.config.server.max_concurrent_requests
        if service.rest_active >= limit:
            raise APIError(503, f"The server is busy: it is at its limit of {limit} transcription requests in "
                                "progress at once. Retry later.", headers={"Retry-After": "1"})
        service.rest_active += 1
        self._service = service
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._service.rest_active -= 1

    def release_with(self, holder) -> None:
        """Release when ``holder`` is garbage-collected, if not before."""
        weakref.finalize(holder, self.release)


async def _decode(upload, max_seconds: float) -> np.ndarray:
    """The upload as 16 kHz mono float32, decoded off the event loop (at most ``max_seconds``)."""
    name = upload.filename or "file"

    def read_and_decode():
        return decode_audio(upload.read(), name, max_seconds=max_seconds)

    try:
        return await asyncio.to_thread(read_and_decode)
    except AudioTooLong as exc:
        log.info("rejected upload: %s", exc)
        raise APIError(400, f"The audio is longer than this server's limit of {_duration(max_seconds)}: "
                            "send a shorter file, or split it.", "file") from None
    except AudioError as exc:
        log.info("rejected upload: %s", exc)
        raise APIError(400, BAD_AUDIO, "file") from None


def _duration(seconds: float) -> str:
    """``10800`` -> ``"10800 s (3 h)"``."""
    if seconds >= 3600:
        return f"{seconds:g} s ({seconds / 3600:g} h)"
    if seconds >= 60:
        return f"{seconds:g} s ({seconds / 60:g} min)"
    return f"{seconds:g} s"


def _timeout(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within this server's request timeout ({seconds:g} s).")


# What a decode may raise that is answered with a status (``_engine_error``), not a 500 with a trace.
DECODE_ERRORS = (Busy, EngineError, ValueError)


def _engine_error(exc: Exception) -> APIError:
    """The status of one of ``DECODE_ERRORS``: 503 busy, 500 the engine failed, 400 bad input."""
    if isinstance(exc, Busy):
        return APIError(503, "The server is busy: too many requests are waiting for the engine. Retry later.",
                        headers={"Retry-After": "1"})
    if isinstance(exc, EngineError):
        log.warning("REST transcription failed in the engine: %s", exc)
        return APIError(500, f"The engine failed: {exc}")
    return APIError(400, str(exc))


def _stream(service, submit, owner: str, audio, options: TranscribeOptions, form: AudioForm, model: str,
            task: str, deadline: float, slot: _Slot) -> Response:
    """Server-sent events: a chunk per window as it is decoded, then ``[DONE]``."""
    rid = ("trsc-" if task == "transcribe" else "trsl-") + secrets.token_hex(12)
    created = int(time.time())
    openai = (form.stream_format or service.config.server.rest_stream_format) == "openai"

    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chunk(content: str, finish_reason: str | None = None) -> str:
        choice = {"delta": {"content": content}}
        if finish_reason is not None:
            choice.update(finish_reason=finish_reason, stop_reason=None)
        return event({"id": rid, "object": "transcription.chunk", "created": created, "model": model,
                      "choices": [choice]})

    async def events():
        queue: asyncio.Queue = asyncio.Queue()

        async def on_segments(segments) -> None:
            queue.put_nowait(("text", "".join(s.text for s in segments)))

        async def work() -> None:
            try:
                queue.put_nowait(("done", await transcribe_async(submit, service.engine, audio, options,
                                                                 on_segments=on_segments)))
            except DECODE_ERRORS as exc:
                queue.put_nowait(("error", _engine_error(exc)))
            except Exception:  # never leave the stream waiting for the deadline
                log.exception("unexpected error in a streamed transcription")
                queue.put_nowait(("error", APIError(500, "Internal server error.")))

        task_ = asyncio.create_task(work())
        started = False
        sent = []  # OpenAI's shape: the deltas, whose join is the done event's text
        service.requests_in_flight += 1  # a drain waits for the stream to end
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    yield event(_timeout(service.config.server.request_timeout_s).body())
                    break
                if kind == "text":
                    text = value if started else value.lstrip()
                    if text:
                        started = True
                        sent.append(text)
                        yield event({"type": "transcript.text.delta", "delta": text}) if openai else chunk(text)
                elif kind == "done" and openai:
                    transcript: Transcript = value
                    yield event({"type": "transcript.text.done", "text": "".join(sent), "usage": {
                        "type": "tokens", "input_tokens": transcript.prompt_tokens,
                        "output_tokens": transcript.completion_tokens,
                        "total_tokens": transcript.prompt_tokens + transcript.completion_tokens}})
                    break
                elif kind == "done":
                    transcript: Transcript = value
                    yield chunk("", "stop")
                    if form.stream_include_usage:
                        yield event({"id": rid, "object": "transcription.chunk", "created": created, "model": model,
                                     "choices": [], "usage": {
                                         "prompt_tokens": transcript.prompt_tokens,
                                         "completion_tokens": transcript.completion_tokens,
                                         "total_tokens": transcript.prompt_tokens + transcript.completion_tokens}})
                    break
                else:
                    yield event(value.body())
                    break
            if not openai:
                yield "data: [DONE]\n\n"
        finally:
            service.requests_in_flight -= 1
            task_.cancel()
            service.batcher.cancel(owner)
            slot.release()

    body = events()
    slot.release_with(body)
    response = Response(body, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = max(1.0, deadline - time.monotonic()) + 30  # a backstop; the generator keeps the deadline
    return response


# -- models, health, metrics ---------------------------------------------------------------------------

def _model_card(service, name: str) -> dict:
    return {"id": name, "object": "model", "created": int(service.started), "owned_by": "jax-realtime",
            "root": service.engine.name, "parent": None}


@rest.get("/v1/models")
async def models():
    service = _service()
    return {"object": "list", "data": [_model_card(service, name) for name in service.model_names]}


@rest.get("/v1/models/<path:model_id>")
async def model(model_id: str):
    service = _service()
    if not service.serves(model_id):
        raise APIError(404, f"The model `{model_id}` does not exist.", "model")
    return _model_card(service, model_id)


@rest.get("/health")
async def health():
    lifecycle = current_app.extensions[LIFECYCLE]
    service = lifecycle.service
    if service is None:  # the engine is loading and compiling (or failed to, and the server is stopping)
        return {"status": lifecycle.state}, 503
    from jax_realtime.engine import compile_stats

    body = {
        "status": "draining" if service.draining.is_set() else "ok",
        "model": service.engine.name,
        "models": list(service.model_names),
        "uptime_s": round(time.time() - service.started, 1),
        "warmup_s": round(service.warmup_seconds, 2),
        "sessions": len(service.sessions),
        "queue_depth": service.batcher.queue_depth,
        "compile": compile_stats(),
        "buckets": len(service.engine.buckets),
        "capacity": service.capacity().as_dict(),
    }
    return body, 503 if service.draining.is_set() else 200  # load balancers stop sending work here


@rest.get("/metrics")
async def metrics():
    return Response(_metrics().render(), content_type=CONTENT_TYPE_LATEST)
