"""OpenAI's Realtime API in transcription mode, GA and beta, on ``/v1/realtime``.

An adapter over the vLLM session (``connection.py``): the same turns, utterances, streaming policy,
levelling, backpressure, admission and turn detection; only the events differ.  The dialect is
chosen at the handshake (``realtime.py``): the header ``OpenAI-Beta: realtime=v1`` selects the beta
protocol, a ``?intent=`` or ``?model=`` query the GA one, and a bare ``/v1/realtime`` stays vLLM's
(a first ``session.update`` whose ``session.type`` is ``"transcription"`` switches it to GA).

Shapes follow the ``openai`` SDK's models (``/work/notes/openai-realtime.md``): every server event
has an ``event_id``; errors are ``{"type": "error", "error": {type, code, message, param,
event_id}}`` and leave the session open.  A turn is an *item*: committed by the client
(``turn_detection: null``) or by the server VAD after the silence that ends it.

* Manual mode: the audio appended since the last commit is decoded as it arrives (the same
  streaming policy as vLLM's sessions), but its deltas are held until the commit; the commit then
  sends ``input_audio_buffer.committed``, the item, one delta with the text so far, the rest of the
  deltas as the policy commits them, ``...transcription.completed`` and (GA) ``conversation.item.done``.
* ``server_vad`` (the default, as OpenAI's): ``speech_started`` announces the item id, deltas
  stream during the turn, then ``speech_stopped``, ``committed``, the item, the last deltas and
  ``completed``.  ``audio_start_ms``/``audio_end_ms`` count the session's input audio.
* Fallbacks (documented in the README): ``semantic_vad`` runs as ``server_vad`` with its defaults;
  ``noise_reduction`` is accepted and not applied (the effective session says ``null``);
  ``include: ["item.input_audio_transcription.logprobs"]`` is accepted, ``logprobs`` are ``null``.
* Extension: ``word_timestamps: true`` in the session's transcription object (on a server with
  word timestamps; echoed only when on) adds ``words: [{word, start, end, probability}]`` to every
  delta: the committed words no delta carried before, in seconds of the session's audio, each sent
  once (vLLM's ``word_timestamps``, ``connection.py``).  A field the SDK's models keep as an extra:
  ``include`` would have to hold a value outside their types.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import string

from jax_realtime.audio import SAMPLE_RATE, InputFormat
from jax_realtime.tokenizer import MAX_PROMPT_CHARS
from jax_realtime.vad import TurnSettings

from . import protocol as p
from .connection import RealtimeConnection, State, Turn

_ALPHABET = string.ascii_letters + string.digits
MIN_COMMIT_SAMPLES = SAMPLE_RATE // 10  # OpenAI refuses to commit less than 100 ms
LOGPROBS = "item.input_audio_transcription.logprobs"
DEFAULT_TURNS = TurnSettings()  # server_vad 0.5 / 300 ms / 500 ms, OpenAI's defaults

GA_FORMATS = {"audio/pcm": "pcm24", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}
BETA_FORMATS = {"pcm16": "pcm24", "g711_ulaw": "pcmu", "g711_alaw": "pcma"}
# Client events answered with an error: they belong to conversation sessions.
CONVERSATION_EVENTS = ("conversation.item.create", "conversation.item.truncate", "conversation.item.delete",
                       "conversation.item.retrieve", "response.create", "response.cancel", "output_audio_buffer.clear")
# Server-side failures (the rest are the client's).
SERVER_CODES = {p.SERVER_BUSY, p.SERVER_SHUTDOWN, p.PROCESSING_ERROR}


def new_id(prefix: str) -> str:
    """OpenAI's ids: ``event_``/``item_``/``sess_`` and 21 letters and digits."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(21))


class OpenAIError(p.ProtocolError):
    """An error event in OpenAI's shape (the session stays open)."""

    def __init__(self, message: str, code: str, param: str | None = None, type_: str = "invalid_request_error"):
        Exception.__init__(self, message)
        self.message, self.code, self.param, self.type = message, code, param, type_
        self.event_type = None


def _invalid_value(value, param: str, supported=None) -> OpenAIError:
    message = f"Invalid value: {value!r}."
    if supported:
        names = [repr(s) for s in supported]
        message += " Supported values are: " + (", ".join(names[:-1]) + ", and " + names[-1] if len(names) > 1
                                                 else names[0]) + "."
    return OpenAIError(message, "invalid_value", param)


def _expect(obj: dict, key: str, param: str, kinds, kind_name: str, nullable: bool = True):
    """``obj[key]`` if present and of ``kinds`` (None when absent)."""
    value = obj.get(key)
    if value is None:
        if key in obj and not nullable:
            raise OpenAIError(f"Invalid type for '{param}': expected {kind_name}, but got null instead.",
                              "invalid_type", param)
        return None
    if not isinstance(value, kinds) or (kinds is not bool and isinstance(value, bool)):
        got = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        raise OpenAIError(f"Invalid type for '{param}': expected {kind_name}, but got {got} instead.",
                          "invalid_type", param)
    return value


class OpenAIConnection(RealtimeConnection):
    """One ``/v1/realtime`` session in OpenAI's transcription protocol (``beta``: the older one)."""

    audio_opens_turns = True

    def __init__(self, websocket, service, *, beta: bool = False, model: str | None = None):
        super().__init__(websocket, service)
        self._init_openai(beta, model)

    @classmethod
    def adopt(cls, connection: RealtimeConnection) -> OpenAIConnection:
        """A vLLM session whose client turns out to speak GA (its first ``session.update`` has a
        transcription ``session``): it becomes a GA session and announces itself again."""
        connection.__class__ = cls
        connection._init_openai(False, None)
        connection.send(connection.created_event())
        return connection

    def _init_openai(self, beta: bool, model: str | None) -> None:
        self.beta = beta
        self.session_id = new_id("sess_")
        self.state = State.IDLE  # usable at once: the model defaults to the served one
        served = self.service.model_names
        self.model = model if model is not None and self.service.serves(model) else served[0]
        self.language: str | None = None
        self.prompt = ""
        self.format = "pcm24"
        self.input = InputFormat(self.format)
        self.include: list[str] | None = None
        self.word_timestamps = False
        self._turn_config: TurnSettings | None = DEFAULT_TURNS
        self._turns_started = False
        self._last_item: str | None = None
        self._client_event_id: str | None = None

    # -- events out -------------------------------------------------------------------------------
    def _event(self, type_: str, **fields) -> dict:
        return {"type": type_, "event_id": new_id("event_"), **fields}

    def created_event(self):
        if not self._turns_started:  # the session is admitted: its turn detection starts now
            self._turns_started = True
            self.set_turn_detection(self._turn_config)
        name = "transcription_session.created" if self.beta else "session.created"
        return self._event(name, session=self._session_object())

    def _session_object(self) -> dict:
        td = self.turn_detection
        td_obj = None if td is None else {"type": "server_vad", "threshold": td.threshold,
                                          "prefix_padding_ms": td.prefix_padding_ms,
                                          "silence_duration_ms": td.silence_duration_ms}
        transcription = {"model": self.model, "language": self.language, "prompt": self.prompt}
        if self.word_timestamps:
            transcription["word_timestamps"] = True
        if self.beta:
            beta_format = {v: k for k, v in BETA_FORMATS.items()}[self.format]
            return {"id": self.session_id, "object": "realtime.transcription_session",
                    "input_audio_format": beta_format, "input_audio_transcription": transcription,
                    "turn_detection": td_obj, "input_audio_noise_reduction": None,
                    "include": self.include or [], "modalities": ["text"], "client_secret": None}
        ga_format = {v: k for k, v in GA_FORMATS.items()}[self.format]
        fmt = {"type": ga_format, "rate": 24000} if ga_format == "audio/pcm" else {"type": ga_format}
        return {"type": "transcription", "object": "realtime.transcription_session", "id": self.session_id,
                "audio": {"input": {"format": fmt, "transcription": transcription, "noise_reduction": None,
                                    "turn_detection": td_obj}},
                "include": self.include}

    def error_event(self, code, message: str | None = None):
        if message is None:
            message = p.MESSAGES[p.ErrorCode(code)]
        kind = "server_error" if code in SERVER_CODES else "invalid_request_error"
        return self._error(OpenAIError(message, str(code), None, kind))

    def _error(self, exc: OpenAIError, event_id: str | None = None) -> dict:
        return self._event("error", error={"type": exc.type, "code": exc.code, "message": exc.message,
                                           "param": exc.param, "event_id": event_id})

    def _protocol_error(self, exc: p.ProtocolError):
        if not isinstance(exc, OpenAIError):
            kind = "server_error" if exc.code in SERVER_CODES else "invalid_request_error"
            exc = OpenAIError(exc.message, str(exc.code), None, kind)
        return self._error(exc, self._client_event_id)

    def _emit_speech_started(self, turn: Turn) -> None:
        turn.item_id = new_id("item_")
        self.send(self._event("input_audio_buffer.speech_started",
                              audio_start_ms=turn.start_sample * 1000 // SAMPLE_RATE, item_id=turn.item_id))

    def _emit_speech_stopped(self, turn: Turn) -> None:
        self.send(self._event("input_audio_buffer.speech_stopped",
                              audio_end_ms=turn.end_sample * 1000 // SAMPLE_RATE, item_id=turn.item_id))

    def _item(self, turn: Turn, transcript: str | None) -> dict:
        return {"id": turn.item_id, "object": "realtime.item", "type": "message", "status": "completed",
                "role": "user", "content": [{"type": "input_audio", "transcript": transcript}]}

    def _emit_committed(self, turn: Turn) -> None:
        turn.item_id = turn.item_id or new_id("item_")
        turn.previous_item_id, self._last_item = self._last_item, turn.item_id
        self.send(self._event("input_audio_buffer.committed", previous_item_id=turn.previous_item_id,
                              item_id=turn.item_id))
        self.send(self._event("conversation.item.created" if self.beta else "conversation.item.added",
                              previous_item_id=turn.previous_item_id, item=self._item(turn, None)))
        if not turn.announced:  # manual mode: the text decoded before the commit, held until now
            turn.announced = True
            # the deltas emitted so far (not utterance.text: a delta may be on its way, emitted after
            # the word alignment the commit arrived during)
            if turn.held_text or turn.held_words:
                self._send_delta(turn, turn.held_text, turn.held_words)
            turn.held_text, turn.held_words = "", None

    def _wants_words(self) -> bool:
        return self.word_timestamps

    def _send_delta(self, turn: Turn, delta: str, words: list[dict] | None) -> None:
        fields = {"item_id": turn.item_id, "content_index": 0, "delta": delta}
        if LOGPROBS in (self.include or []):
            fields["logprobs"] = None
        if words is not None:
            fields["words"] = words
        self.send(self._event("conversation.item.input_audio_transcription.delta", **fields))

    def _emit_delta(self, turn: Turn, delta: str, words: list[dict] | None) -> None:
        if turn.announced:
            self._send_delta(turn, delta, words)
            return
        turn.held_text += delta  # sent at the commit
        if words is not None:
            turn.held_words = (turn.held_words or []) + words

    def _emit_partial(self, turn: Turn, utterance) -> None:
        pass  # OpenAI's protocol has no unstable text

    def _emit_done(self, turn, utterance) -> None:
        self.send(self._event("conversation.item.input_audio_transcription.completed", item_id=turn.item_id,
                              content_index=0, transcript=utterance.text, logprobs=None,
                              usage={"type": "duration", "seconds": round(turn.samples / SAMPLE_RATE, 3)}))
        if not self.beta:
            self.send(self._event("conversation.item.done", previous_item_id=turn.previous_item_id,
                                  item=self._item(turn, utterance.text)))

    def _emit_failed(self, turn: Turn, message: str) -> None:
        self.send(self._event("conversation.item.input_audio_transcription.failed", item_id=turn.item_id,
                              content_index=0, error={"type": "server_error", "code": "processing_error",
                                                      "message": message, "param": None}))

    def _decoding(self) -> tuple[str | None, str]:
        return self.language, "transcribe"

    # -- events in --------------------------------------------------------------------------------
    def _parse(self, message: str) -> dict:
        self._client_event_id = None
        try:
            event = json.loads(message)
        except (ValueError, RecursionError):
            raise OpenAIError("The event is not valid JSON.", "invalid_json") from None
        if not isinstance(event, dict):
            raise OpenAIError("An event must be a JSON object.", "invalid_event")
        if isinstance(event.get("event_id"), str):
            self._client_event_id = event["event_id"]
        if "type" not in event or event["type"] is None:
            raise OpenAIError("The 'type' field is missing.", "invalid_event", "type")
        return event

    def _handle(self, event: dict) -> None:
        kind = event["type"]
        update = "transcription_session.update" if self.beta else "session.update"
        if kind == update:
            self._update_session(event)
        elif kind == "input_audio_buffer.append":
            self._append_audio(event)
        elif kind == "input_audio_buffer.commit":
            self._commit_buffer()
        elif kind == "input_audio_buffer.clear":
            self._clear_buffer()
            self.send(self._event("input_audio_buffer.cleared"))
        elif kind in CONVERSATION_EVENTS or kind in ("session.update", "transcription_session.update"):
            raise OpenAIError(f"'{kind}' is not supported in a transcription session"
                              + (f"; send '{update}'." if "session.update" in kind else "."),
                              "unsupported_event", "type")
        else:
            supported = [update, "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear"]
            raise _invalid_value(kind, "type", supported)

    def _append_audio(self, event: dict) -> None:
        data = _expect(event, "audio", "audio", str, "a string", nullable=False)
        if data is None:
            raise OpenAIError("Missing required parameter: 'audio'.", "missing_required_parameter", "audio")
        limit = self.service.config.server.max_message_bytes
        bad = OpenAIError(f"Invalid 'audio'. Expected base64-encoded audio bytes ({self._format_name()}) but got "
                          "an invalid value.", "invalid_value", "audio")
        if len(data) > 4 * -(-limit // 3):
            raise OpenAIError(f"Invalid 'audio': more than {limit} bytes in one event.", "invalid_value", "audio")
        try:
            pcm = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad from None
        if len(pcm) % self.input.bytes_per_sample:
            raise bad
        if pcm:
            self._take_audio(self.input.decode(pcm))

    def _format_name(self) -> str:
        return {"pcm24": "mono PCM16 at 24kHz", "pcmu": "G.711 u-law", "pcma": "G.711 A-law"}[self.format]

    def _commit_buffer(self) -> None:
        if self.draining:
            raise p.ProtocolError(p.SERVER_SHUTDOWN)
        if self.turn_detection is not None:
            turn = self._end_detected_turn(MIN_COMMIT_SAMPLES)
            if turn is None:
                raise self._commit_empty(0)
            return
        turn = self._open_turn()
        if turn is None or turn.samples < MIN_COMMIT_SAMPLES:
            raise self._commit_empty(turn.samples if turn is not None else 0)
        self._close_turn(turn, flush=True)

    @staticmethod
    def _commit_empty(samples: int) -> OpenAIError:
        return OpenAIError("Error committing input audio buffer: buffer too small. Expected at least 100ms of "
                           f"audio, but buffer only has {1000 * samples / SAMPLE_RATE:.2f}ms of audio.",
                           "input_audio_buffer_commit_empty")

    # -- session.update / transcription_session.update -------------------------------------------
    def _update_session(self, event: dict) -> None:
        session = _expect(event, "session", "session", dict, "an object")
        if session is None:
            raise OpenAIError("Missing required parameter: 'session'.", "missing_required_parameter", "session")
        if self.beta:
            changes = self._beta_changes(session)
        else:
            changes = self._ga_changes(session)
        model = changes.get("model", self.model)
        if not self.service.serves(model):
            raise OpenAIError(f"The model `{model}` does not exist.", "model_not_found", changes["model_param"])
        language = changes.get("language", self.language)
        try:
            self.service.engine.tokenizer.sot_sequence(language, "transcribe")
        except ValueError as exc:
            raise OpenAIError(str(exc)[:1].upper() + str(exc)[1:] + ".", "invalid_value",
                              changes["language_param"]) from None
        prompt = changes.get("prompt", self.prompt)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise OpenAIError(f"Invalid '{changes['prompt_param']}': at most {MAX_PROMPT_CHARS} characters, "
                              f"not {len(prompt)}.", "string_above_max_length", changes["prompt_param"])
        if changes.get("word_timestamps") and not self.service.engine.word_timestamps:
            param = changes["language_param"].replace(".language", ".word_timestamps")
            raise OpenAIError(f"Invalid '{param}': word-level timestamps are not enabled on this server (start "
                              "it with --word-timestamps or [engine] word_timestamps = true).", "invalid_value", param)
        # everything checked: apply
        self.model, self.language, self.prompt = model, language, prompt
        self.prompt_tokens = self.service.engine.tokenizer.encode_prompt(prompt)
        if "include" in changes:
            self.include = changes["include"]
        self.word_timestamps = changes.get("word_timestamps", self.word_timestamps)
        if changes.get("format", self.format) != self.format:
            self._route(self._flush_input())  # what the old format's resampler holds
            self.format = changes["format"]
            self.input = InputFormat(self.format)
        if "turn_detection" in changes:
            self._turn_config = changes["turn_detection"]
            self.set_turn_detection(self._turn_config)
        name = "transcription_session.updated" if self.beta else "session.updated"
        self.send(self._event(name, session=self._session_object()))

    def _ga_changes(self, session: dict) -> dict:
        changes = {"model_param": "session.audio.input.transcription.model",
                   "language_param": "session.audio.input.transcription.language",
                   "prompt_param": "session.audio.input.transcription.prompt"}
        kind = _expect(session, "type", "session.type", str, "a string")
        if kind is None:
            raise OpenAIError("Missing required parameter: 'session.type'.", "missing_required_parameter",
                              "session.type")
        if kind != "transcription":
            raise OpenAIError(f"Invalid value: '{kind}'. This server serves transcription sessions only: "
                              "'session.type' must be 'transcription'.", "invalid_value", "session.type")
        audio = _expect(session, "audio", "session.audio", dict, "an object") or {}
        source = _expect(audio, "input", "session.audio.input", dict, "an object") or {}
        if "format" in source:
            fmt = _expect(source, "format", "session.audio.input.format", dict, "an object")
            if fmt is not None:
                kind = fmt.get("type", "audio/pcm")
                if kind not in GA_FORMATS:
                    raise _invalid_value(kind, "session.audio.input.format.type", list(GA_FORMATS))
                rate = fmt.get("rate")
                if kind == "audio/pcm" and rate not in (None, 24000):
                    raise _invalid_value(rate, "session.audio.input.format.rate", [24000])
                changes["format"] = GA_FORMATS[kind]
        if "transcription" in source:
            tr = _expect(source, "transcription", "session.audio.input.transcription", dict, "an object",
                         nullable=False)
            self._transcription_changes(tr, "session.audio.input.transcription", changes)
        if "turn_detection" in source:
            changes["turn_detection"] = self._turn_detection(source["turn_detection"],
                                                             "session.audio.input.turn_detection")
        if "noise_reduction" in source:  # accepted, not applied (the effective session says null)
            _expect(source, "noise_reduction", "session.audio.input.noise_reduction", dict, "an object")
        if "include" in session:
            changes["include"] = self._include(session, "session.include")
        return changes

    def _beta_changes(self, session: dict) -> dict:
        changes = {"model_param": "session.input_audio_transcription.model",
                   "language_param": "session.input_audio_transcription.language",
                   "prompt_param": "session.input_audio_transcription.prompt"}
        fmt = _expect(session, "input_audio_format", "session.input_audio_format", str, "a string")
        if fmt is not None:
            if fmt not in BETA_FORMATS:
                raise _invalid_value(fmt, "session.input_audio_format", list(BETA_FORMATS))
            changes["format"] = BETA_FORMATS[fmt]
        if "input_audio_transcription" in session:
            tr = _expect(session, "input_audio_transcription", "session.input_audio_transcription", dict,
                         "an object", nullable=False)
            self._transcription_changes(tr, "session.input_audio_transcription", changes)
        if "turn_detection" in session:
            changes["turn_detection"] = self._turn_detection(session["turn_detection"], "session.turn_detection")
        if "input_audio_noise_reduction" in session:
            _expect(session, "input_audio_noise_reduction", "session.input_audio_noise_reduction", dict, "an object")
        if "include" in session:
            changes["include"] = self._include(session, "session.include")
        return changes

    @staticmethod
    def _transcription_changes(tr: dict, where: str, changes: dict) -> None:
        model = _expect(tr, "model", f"{where}.model", str, "a string")
        if model is not None:
            changes["model"] = model
        if "language" in tr:
            language = _expect(tr, "language", f"{where}.language", str, "a string")
            changes["language"] = language.strip().lower() or None if language is not None else None
        if "prompt" in tr:
            changes["prompt"] = _expect(tr, "prompt", f"{where}.prompt", str, "a string") or ""
        if "word_timestamps" in tr:  # the extension
            changes["word_timestamps"] = bool(_expect(tr, "word_timestamps", f"{where}.word_timestamps", bool,
                                                      "a boolean"))

    @staticmethod
    def _turn_detection(value, where: str) -> TurnSettings | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise OpenAIError(f"Invalid type for '{where}': expected an object, but got a "
                              f"{type(value).__name__} instead.", "invalid_type", where)
        kind = value.get("type", "server_vad")
        if kind == "semantic_vad":  # documented fallback: server_vad with its defaults
            return DEFAULT_TURNS
        if kind != "server_vad":
            raise _invalid_value(kind, f"{where}.type", ["server_vad", "semantic_vad"])
        settings = {}
        for key, default, low, high, kinds in (("threshold", DEFAULT_TURNS.threshold, 0.0, 1.0, (int, float)),
                                               ("prefix_padding_ms", DEFAULT_TURNS.prefix_padding_ms, 0, 10_000, int),
                                               ("silence_duration_ms", DEFAULT_TURNS.silence_duration_ms, 0, 60_000,
                                                int)):
            number = _expect(value, key, f"{where}.{key}", kinds, "a number")
            if number is None:
                number = default
            if not low <= number <= high:
                raise OpenAIError(f"Invalid '{where}.{key}': {number} is outside [{low}, {high}].",
                                  "invalid_value", f"{where}.{key}")
            settings[key] = number
        return TurnSettings(float(settings["threshold"]), settings["prefix_padding_ms"],
                            settings["silence_duration_ms"])

    @staticmethod
    def _include(session: dict, where: str) -> list[str] | None:
        include = _expect(session, "include", where, list, "an array")
        for item in include or []:
            if item != LOGPROBS:
                raise _invalid_value(item, where, [LOGPROBS])
        return list(include) if include else None


def choose(websocket) -> dict | None:
    """The OpenAI dialect a handshake asks for (``{"beta": ..., "model": ...}``), or None for vLLM's."""
    beta = "realtime=v1" in websocket.headers.get("OpenAI-Beta", "").replace(" ", "")
    args = websocket.args
    if beta or "intent" in args or "model" in args:
        return {"beta": beta, "model": args.get("model")}
    return None


def wants_ga(message: str) -> bool:
    """A first event of a GA client on the bare path: ``session.update`` with a transcription session."""
    try:
        event = json.loads(message)
    except (ValueError, RecursionError):
        return False
    return (isinstance(event, dict) and event.get("type") == "session.update" and isinstance(event.get("session"), dict)
            and event["session"].get("type") == "transcription")


def upgrade(connection: RealtimeConnection, message: str) -> OpenAIConnection | None:
    """The hook a vLLM session is given (``RealtimeConnection(upgrade=...)``): a GA client's first
    event turns it into a GA session."""
    return OpenAIConnection.adopt(connection) if wants_ga(message) else None


__all__ = ["OpenAIConnection", "OpenAIError", "choose", "upgrade", "wants_ga", "new_id"]
