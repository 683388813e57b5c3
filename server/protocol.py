"""The ``/v1/realtime`` wire protocol: event models, parsing, error codes (pure; no I/O).

Spec: ``/work/shared/docs/realtime-protocol.md``. Reference: vLLM's realtime transcription router
(``vllm/entrypoints/speech_to_text/realtime/{protocol,connection}.py``). Event names, field names,
error codes and messages are exact; where vLLM and our spec differ, the spec wins (noted inline).

One pydantic model per event. Client events ignore unknown keys (``event_id`` etc.); dispatch on
``type`` is done by a pydantic discriminated union, not by string comparisons in the caller.
Server events serialise in declaration order with ``type`` first and nulls kept (see :func:`dump`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_serializer

__all__ = [
    "ErrorCode",
    "INVALID_JSON",
    "UNKNOWN_EVENT",
    "INVALID_EVENT",
    "MODEL_NOT_FOUND",
    "MODEL_NOT_VALIDATED",
    "INVALID_AUDIO",
    "PROCESSING_ERROR",
    "BUFFER_FULL",
    "IDLE_TIMEOUT",
    "INVALID_FRAME",
    "SERVER_BUSY",
    "SERVER_SHUTDOWN",
    "MESSAGES",
    "unknown_event_message",
    "model_not_found_message",
    "MAX_MESSAGE_CHARS",
    "clip_message",
    "ProtocolError",
    "error_event",
    "ServerVAD",
    "SessionUpdate",
    "InputAudioBufferAppend",
    "InputAudioBufferCommit",
    "InputAudioBufferClear",
    "ClientEvent",
    "parse_client_event",
    "decode_audio_payload",
    "Usage",
    "SessionCreated",
    "SessionUpdated",
    "TranscriptionDelta",
    "TranscriptionDone",
    "TranscriptionPartial",
    "ErrorEvent",
    "ServerEvent",
    "dump",
]


# --------------------------------------------------------------------------------------------
# Error codes and their messages (the one place they are spelled)
# --------------------------------------------------------------------------------------------


class ErrorCode(StrEnum):
    """Every ``code`` the server puts in an ``error`` event."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_EVENT = "unknown_event"
    INVALID_EVENT = "invalid_event"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_NOT_VALIDATED = "model_not_validated"
    INVALID_AUDIO = "invalid_audio"
    PROCESSING_ERROR = "processing_error"
    # Extensions (vLLM has open proposals using the same names).
    BUFFER_FULL = "buffer_full"  # the session's queued audio is over its cap; socket stays open
    IDLE_TIMEOUT = "idle_timeout"  # sent, then the server closes the socket
    INVALID_FRAME = "invalid_frame"  # a binary frame; socket stays open
    SERVER_BUSY = "server_busy"  # connection refused for capacity, then close
    SERVER_SHUTDOWN = "server_shutdown"  # the service is stopping: audio it will not transcribe, then close


# Module-level aliases, so callers can write ``protocol.BUFFER_FULL`` (each equals its string).
INVALID_JSON = ErrorCode.INVALID_JSON
UNKNOWN_EVENT = ErrorCode.UNKNOWN_EVENT
INVALID_EVENT = ErrorCode.INVALID_EVENT
MODEL_NOT_FOUND = ErrorCode.MODEL_NOT_FOUND
MODEL_NOT_VALIDATED = ErrorCode.MODEL_NOT_VALIDATED
INVALID_AUDIO = ErrorCode.INVALID_AUDIO
PROCESSING_ERROR = ErrorCode.PROCESSING_ERROR
BUFFER_FULL = ErrorCode.BUFFER_FULL
IDLE_TIMEOUT = ErrorCode.IDLE_TIMEOUT
INVALID_FRAME = ErrorCode.INVALID_FRAME
SERVER_BUSY = ErrorCode.SERVER_BUSY
SERVER_SHUTDOWN = ErrorCode.SERVER_SHUTDOWN

#: Codes whose message never varies. ``unknown_event`` and ``model_not_found`` embed a value (see
#: the two functions below); ``processing_error`` carries the text of whatever went wrong.
MESSAGES: Mapping[ErrorCode, str] = MappingProxyType(
    {
        ErrorCode.INVALID_JSON: "Invalid JSON",
        ErrorCode.INVALID_EVENT: "Missing required field: model",
        ErrorCode.MODEL_NOT_VALIDATED: (
            "Model not validated. Make sure to validate the model by sending a session.update event."
        ),
        ErrorCode.INVALID_AUDIO: "Invalid audio data",
        ErrorCode.BUFFER_FULL: "Audio buffer full",
        ErrorCode.IDLE_TIMEOUT: "Session idle timeout exceeded; closing the connection.",
        ErrorCode.INVALID_FRAME: "Binary frames are not supported; send JSON events as text frames.",
        ErrorCode.SERVER_BUSY: "Server busy: too many concurrent sessions. Try again later.",
        ErrorCode.SERVER_SHUTDOWN: "Server shutting down: no new audio is accepted.",
    }
)


#: The longest ``error`` message sent.  Messages echo what the client sent (an unknown ``type``, a
#: model name, a language): a frame may be megabytes, and a client that does not read its events
#: can have up to connection.OUTBOX_LIMIT of them queued -- with the echo clipped, a few hundred kB.
MAX_MESSAGE_CHARS = 1000


def clip_message(message: str) -> str:
    """``message``, or its first ``MAX_MESSAGE_CHARS`` characters and how long it was."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters)"


def unknown_event_message(event_type: object) -> str:
    """``Unknown event type: <type>``; ``<type>`` is Python's ``str()`` of the value (``None`` when
    the key is missing or null), exactly as vLLM formats it."""
    return f"Unknown event type: {event_type}"


def model_not_found_message(model: str) -> str:
    return f"The model `{model}` does not exist."


class ProtocolError(Exception):
    """A non-fatal protocol violation, reported to the client as one ``error`` event.

    ``message`` defaults to the code's fixed message (a code without one needs it spelled out).
    ``event_type`` is the client event's ``type`` when it was recognised (e.g. a malformed commit),
    so a caller can apply vLLM's ordering where it checks session state before field types.
    """

    def __init__(
        self, code: ErrorCode | str, message: str | None = None, *, event_type: str | None = None
    ) -> None:
        code = ErrorCode(code)
        if message is None:
            try:
                message = MESSAGES[code]
            except KeyError:
                raise ValueError(f"error code {code.value!r} needs an explicit message") from None
        message = clip_message(message)
        super().__init__(message)
        self.code: ErrorCode = code
        self.message: str = message
        self.event_type: str | None = event_type

    @classmethod
    def unknown_event(cls, event_type: object) -> ProtocolError:
        return cls(ErrorCode.UNKNOWN_EVENT, unknown_event_message(event_type))

    @classmethod
    def model_not_found(cls, model: str) -> ProtocolError:
        return cls(ErrorCode.MODEL_NOT_FOUND, model_not_found_message(model))

    def to_event(self) -> ErrorEvent:
        return ErrorEvent(error=self.message, code=self.code.value)

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r})"


def error_event(code: ErrorCode | str, message: str | None = None) -> ErrorEvent:
    """The ``error`` event for ``code``; ``message`` defaults to the code's fixed message."""
    return ProtocolError(code, message).to_event()


# --------------------------------------------------------------------------------------------
# Client -> server events
# --------------------------------------------------------------------------------------------


class ServerVAD(BaseModel):
    """OpenAI's ``server_vad`` turn detection (the conversation-only knobs are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=10_000)
    silence_duration_ms: int = Field(500, ge=0, le=60_000)

    def settings(self):
        from jax_realtime.vad import TurnSettings

        return TurnSettings(self.threshold, self.prefix_padding_ms, self.silence_duration_ms)


class _ClientEventBase(BaseModel):
    # Unknown keys (``event_id``, OpenAI fields we do not implement) are accepted and dropped.
    model_config = ConfigDict(extra="ignore", frozen=True)


class SessionUpdate(_ClientEventBase):
    """Validates the model for this connection; may be repeated."""

    type: Literal["session.update"] = "session.update"
    model: str
    # Extensions. ``language`` None = detect; which codes are served is checked by the caller.
    language: str | None = None
    prompt: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    # Extension, opt-in: send ``transcription.partial`` after each decoding step.
    partials: bool = False
    # Extension, opt-in: server-side turn detection (OpenAI's ``server_vad``): every spoken turn
    # becomes one utterance, ended by the silence after it (one ``transcription.done`` per turn);
    # no commit is needed.  ``null`` (the default): turns are the client's commits, as in vLLM.
    turn_detection: ServerVAD | None = None
    # Extension, opt-in: ``transcription.delta`` carries the committed words with their times
    # (the server must have word timestamps enabled: ``[engine] word_timestamps = true``).
    word_timestamps: bool = False


class InputAudioBufferAppend(_ClientEventBase):
    type: Literal["input_audio_buffer.append"] = "input_audio_buffer.append"
    audio: str  # base64 of PCM16 LE mono 16 kHz; decode with decode_audio_payload()


class InputAudioBufferCommit(_ClientEventBase):
    """``final: false`` starts an utterance; ``final: true`` ends the running one's audio.

    ``final`` is validated like vLLM's (pydantic's standard bool, not Python truthiness): JSON
    true/false, 0/1, and the strings pydantic recognises ("true"/"false", "1"/"0", "yes"/"no",
    "on"/"off", "t"/"f", "y"/"n", any case) are accepted, so a client that works against vLLM
    works here; anything else (null, 2, "maybe", a list) is a ``processing_error``.
    """

    type: Literal["input_audio_buffer.commit"] = "input_audio_buffer.commit"
    final: bool = False


class InputAudioBufferClear(_ClientEventBase):
    """Extension from OpenAI's protocol: drop queued audio not yet consumed."""

    type: Literal["input_audio_buffer.clear"] = "input_audio_buffer.clear"


ClientEvent = Annotated[
    Union[SessionUpdate, InputAudioBufferAppend, InputAudioBufferCommit, InputAudioBufferClear],
    Field(discriminator="type"),
]
_CLIENT_EVENT = TypeAdapter(ClientEvent)


def parse_client_event(text: str) -> ClientEvent:
    """Parse one text frame into a client event or raise :class:`ProtocolError`.

    =========================================  ==================  ==============================
    input                                      code                message
    =========================================  ==================  ==============================
    not JSON                                   invalid_json        ``Invalid JSON``
    JSON, but not an object                    processing_error    vLLM's exception text
    a string with a lone UTF-16 surrogate      processing_error    ``Invalid text: ...``
    ``type`` missing, null or unknown          unknown_event       ``Unknown event type: <type>``
    ``session.update`` with no/null ``model``  invalid_event       ``Missing required field: model``
    a field missing or of the wrong type       processing_error    ``Invalid <type> event: ...``
    =========================================  ==================  ==============================
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON) from None
    except (ValueError, RecursionError) as exc:
        # Valid JSON that Python will not materialise (an integer over the digit limit, nesting
        # deeper than the recursion limit). vLLM reports these as processing_error too.
        raise ProtocolError(ErrorCode.PROCESSING_ERROR, str(exc)) from None
    if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(obj):
        # ``"\ud800"`` is valid JSON, but no UTF-8 text: echoed in an error event (an unknown type, a
        # model name) or tokenised (a prompt) it would fail there instead, ending the session.
        raise ProtocolError(ErrorCode.PROCESSING_ERROR, LONE_SURROGATE_MESSAGE)
    if not isinstance(obj, dict):
        # vLLM calls ``event.get("type")`` on whatever json.loads returned; the resulting
        # AttributeError text is what its clients see. Reproduced verbatim.
        raise ProtocolError(
            ErrorCode.PROCESSING_ERROR, f"'{type(obj).__name__}' object has no attribute 'get'"
        )
    try:
        return _CLIENT_EVENT.validate_python(obj)
    except ValidationError as exc:
        raise _translate_validation_error(obj, exc) from None


# A \u escape of a UTF-16 surrogate (D800-DFFF); only text holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
LONE_SURROGATE_MESSAGE = "Invalid text: a JSON string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)"


def _holds_lone_surrogate(obj: object) -> bool:
    """Whether a key or string anywhere in ``obj`` holds a lone surrogate (json.loads joins the
    escapes of a pair into one character, so what is left cannot be encoded).  Iterative: ``obj``
    may be nested as deep as json.loads allowed."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _translate_validation_error(obj: dict, exc: ValidationError) -> ProtocolError:
    errors = exc.errors(include_url=False, include_context=False)
    if any(e["type"] in ("union_tag_not_found", "union_tag_invalid") for e in errors):
        return ProtocolError.unknown_event(obj.get("type"))
    event_type: str = obj["type"]  # the tag matched, so it is one of ours
    # vLLM checks ``model is None`` before anything else in a session.update.
    for e in errors:
        if e["loc"][1:] == ("model",) and (e["type"] == "missing" or e["input"] is None):
            return ProtocolError(ErrorCode.INVALID_EVENT, event_type=event_type)
    details = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'][1:])}: {e['msg']}" for e in errors
    )
    return ProtocolError(
        ErrorCode.PROCESSING_ERROR, f"Invalid {event_type} event: {details}", event_type=event_type
    )


def decode_audio_payload(b64: str, max_bytes: int) -> bytes:
    """Strictly decode an append's base64 into PCM16 bytes, or raise ``invalid_audio``.

    Rejected: characters outside the standard base64 alphabet (whitespace included) or bad
    padding, an empty result, an odd byte count, and more than ``max_bytes`` bytes. Oversized
    input is rejected from its length alone, before decoding.
    """
    # Valid base64 of n bytes is 4*ceil(n/3) characters; anything longer decodes to > max_bytes.
    if not b64 or len(b64) > 4 * -(-max_bytes // 3):
        raise ProtocolError(ErrorCode.INVALID_AUDIO)
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in a str
        raise ProtocolError(ErrorCode.INVALID_AUDIO) from None
    if not data or len(data) % 2 or len(data) > max_bytes:
        raise ProtocolError(ErrorCode.INVALID_AUDIO)
    return data


# --------------------------------------------------------------------------------------------
# Server -> client events
# --------------------------------------------------------------------------------------------


class _ServerEventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Usage(_ServerEventBase):
    """Key order is part of the protocol: prompt, total, completion, details (always null)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int
    prompt_tokens_details: None = None

    @classmethod
    def from_counts(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            completion_tokens=completion_tokens,
        )


class SessionCreated(_ServerEventBase):
    type: Literal["session.created"] = "session.created"
    id: str  # "sess-" + 16 lowercase hex
    created: int  # unix seconds

    @classmethod
    def new(cls) -> SessionCreated:
        return cls(id=f"sess-{secrets.token_hex(8)}", created=int(time.time()))


class SessionUpdated(_ServerEventBase):
    """Extension: the effective session after a successful ``session.update``."""

    type: Literal["session.updated"] = "session.updated"
    model: str
    language: str | None
    prompt: str | None
    task: Literal["transcribe", "translate"]
    partials: bool = False
    turn_detection: ServerVAD | None = None  # echoed only when set (see dump)
    word_timestamps: bool = False

    @classmethod
    def from_update(cls, update: SessionUpdate) -> SessionUpdated:
        return cls(
            model=update.model, language=update.language, prompt=update.prompt, task=update.task,
            partials=update.partials, turn_detection=update.turn_detection,
            word_timestamps=update.word_timestamps,
        )


class DeltaWord(_ServerEventBase):
    """A committed word (REST's ``verbose_json`` words): its text without the leading space, and
    its start and end in seconds of the session's audio (from the first sample it sent)."""

    word: str
    start: float
    end: float
    probability: float


class TranscriptionDelta(_ServerEventBase):
    """``words`` (extension, only after ``session.update`` with ``word_timestamps: true``): the
    words completed by the text committed so far that no earlier delta carried, each sent once,
    its times final.  A word is sent once the next word has begun (a trailing punctuation mark
    may still join it until then), or when the audio it lies in has left the decoding window, or
    at the end of the utterance; so the words lag the text by a word or so, and a delta may carry
    words only (``delta: ""``).  The key is absent without the extension."""

    type: Literal["transcription.delta"] = "transcription.delta"
    delta: str
    words: list[DeltaWord] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_words(self, handler):
        out = handler(self)
        if out.get("words", ...) is None:
            del out["words"]
        return out


class TranscriptionPartial(_ServerEventBase):
    """Extension, only after ``session.update`` with ``partials: true``: the running utterance's
    unstable text beyond what the deltas sent so far (it may still change). Each replaces the
    previous one; "" clears it. vLLM clients never see it."""

    type: Literal["transcription.partial"] = "transcription.partial"
    text: str


class TranscriptionDone(_ServerEventBase):
    type: Literal["transcription.done"] = "transcription.done"
    text: str
    usage: Usage


class ErrorEvent(_ServerEventBase):
    """Non-fatal error. ``error`` is the message string (not an object, unlike OpenAI's)."""

    type: Literal["error"] = "error"
    error: str
    code: str


ServerEvent = Union[
    SessionCreated, SessionUpdated, TranscriptionDelta, TranscriptionPartial, TranscriptionDone, ErrorEvent
]


def dump(event: ServerEvent | dict) -> str:
    """Compact JSON, keys in declaration order (``type`` first), nulls kept, UTF-8 unescaped.

    A dict (an OpenAI-dialect event, ``openai_realtime.py``) is dumped as it is."""
    if isinstance(event, dict):
        return json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    if isinstance(event, SessionUpdated) and event.turn_detection is None:
        return event.model_dump_json(exclude={"turn_detection"})  # vLLM's session.updated, unchanged
    return event.model_dump_json()
