"""server/protocol.py: the /v1/realtime wire format (pure; no server, no engine)."""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
from pydantic import ValidationError

from server.protocol import (
    MAX_MESSAGE_CHARS,
    DeltaWord,
    MESSAGES,
    ErrorCode,
    ErrorEvent,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    ProtocolError,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    TranscriptionDelta,
    TranscriptionDone,
    TranscriptionPartial,
    Usage,
    decode_audio_payload,
    dump,
    error_event,
    model_not_found_message,
    parse_client_event,
    unknown_event_message,
)

MODEL_NOT_VALIDATED = (
    "Model not validated. Make sure to validate the model by sending a session.update event."
)


def parse_error(text: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_client_event(text)
    return info.value


# ---------------------------------------------------------------- error table, row by row


@pytest.mark.parametrize("text", ["", "not json", "{", '{"type": "session.update",}', "{'a': 1}", "nul"])
def test_not_json_is_invalid_json(text):
    err = parse_error(text)
    assert (err.code, err.message) == ("invalid_json", "Invalid JSON")


@pytest.mark.parametrize(
    "text, type_name",
    [("[]", "list"), ('["a"]', "list"), ('"x"', "str"), ("1", "int"), ("1.5", "float"),
     ("true", "bool"), ("null", "NoneType")],
)
def test_json_that_is_not_an_object_is_processing_error(text, type_name):
    err = parse_error(text)
    assert err.code == "processing_error"
    # vLLM's text: it calls event.get("type") on whatever json.loads returned.
    assert err.message == f"'{type_name}' object has no attribute 'get'"


@pytest.mark.parametrize(
    "obj, shown",
    [({}, "None"), ({"type": None}, "None"), ({"event_id": "e1"}, "None"),
     ({"type": "response.create"}, "response.create"), ({"type": "session.updated"}, "session.updated"),
     ({"type": ""}, ""), ({"type": 5}, "5"), ({"type": ["a"]}, "['a']"), ({"type": True}, "True")],
)
def test_missing_or_unknown_type_is_unknown_event(obj, shown):
    err = parse_error(json.dumps(obj))
    assert err.code == "unknown_event"
    assert err.message == f"Unknown event type: {shown}"


@pytest.mark.parametrize(
    "obj",
    [{"type": "session.update"}, {"type": "session.update", "model": None},
     {"type": "session.update", "language": "en"},
     # the model check comes first, as in vLLM, even when other fields are also bad
     {"type": "session.update", "task": "dance"}],
)
def test_session_update_without_model_is_invalid_event(obj):
    err = parse_error(json.dumps(obj))
    assert (err.code, err.message) == ("invalid_event", "Missing required field: model")
    assert err.event_type == "session.update"


@pytest.mark.parametrize(
    "obj, field",
    [
        ({"type": "session.update", "model": 5}, "model"),
        ({"type": "session.update", "model": ["m"]}, "model"),
        ({"type": "session.update", "model": "m", "language": 1}, "language"),
        ({"type": "session.update", "model": "m", "prompt": {"a": 1}}, "prompt"),
        ({"type": "session.update", "model": "m", "task": "dance"}, "task"),
        ({"type": "session.update", "model": "m", "task": None}, "task"),
        ({"type": "input_audio_buffer.append"}, "audio"),
        ({"type": "input_audio_buffer.append", "audio": None}, "audio"),
        ({"type": "input_audio_buffer.append", "audio": 123}, "audio"),
        ({"type": "input_audio_buffer.commit", "final": "maybe"}, "final"),
        ({"type": "input_audio_buffer.commit", "final": None}, "final"),
        ({"type": "input_audio_buffer.commit", "final": 2}, "final"),
        ({"type": "input_audio_buffer.commit", "final": [True]}, "final"),
    ],
)
def test_wrong_field_type_is_processing_error(obj, field):
    err = parse_error(json.dumps(obj))
    assert err.code == "processing_error"
    assert err.event_type == obj["type"]
    # readable: one line, names the event and the field, no pydantic URL
    assert err.message.startswith(f"Invalid {obj['type']} event: {field}: ")
    assert "\n" not in err.message and "http" not in err.message


def test_processing_error_lists_every_bad_field():
    err = parse_error(json.dumps({"type": "session.update", "model": "m", "language": 1, "prompt": 2}))
    assert err.code == "processing_error"
    assert "language: " in err.message and "prompt: " in err.message and "; " in err.message


def test_unmaterialisable_json_is_processing_error():
    err = parse_error('{"type": "input_audio_buffer.commit", "n": ' + "1" * 5000 + "}")
    assert err.code == "processing_error" and err.message
    err = parse_error("[" * 100_000 + "]" * 100_000)
    assert err.code == "processing_error" and err.message


@pytest.mark.parametrize("text", [
    r'{"type": "\ud800"}',  # echoed in unknown_event
    r'{"type": "session.update", "model": "x\udfff"}',  # echoed in model_not_found
    r'{"type": "session.update", "model": "tiny.en", "prompt": "a\udc00b"}',  # tokenised
    r'{"type": "session.update", "model": "tiny.en", "language": "\ud83d"}',  # echoed in processing_error
    r'{"type": "input_audio_buffer.commit", "event_id": ["\ud800\ud800"]}',  # ignored key: still refused
    r'{"\udfff": 1, "type": "input_audio_buffer.clear"}',  # a key
    r'[[["\ud800"]]]',
])
def test_a_lone_surrogate_is_processing_error(text):
    """Valid JSON, but not text UTF-8 can carry: refused at parse time, before it is echoed in an
    error event or tokenised -- either failed with an exception that ended the session."""
    err = parse_error(text)
    assert err.code == "processing_error" and "lone UTF-16 surrogate" in err.message
    assert json.loads(dump(err.to_event()))["code"] == "processing_error"  # the answer itself serialises


@pytest.mark.parametrize("text, expected", [
    (r'{"type": "session.update", "model": "m", "prompt": "\ud83d\ude00"}', "\U0001f600"),  # a pair: one emoji
    (r'{"type": "session.update", "model": "m", "prompt": "\\ud800"}', "\\ud800"),  # an escaped backslash
    ('{"type": "session.update", "model": "m", "prompt": "\U0001f600 \u00e9"}', "\U0001f600 \u00e9"),
])
def test_surrogate_pairs_and_lookalikes_are_text(text, expected):
    assert parse_client_event(text).prompt == expected


@pytest.mark.parametrize("text, start", [
    (json.dumps({"type": "x" * 1_000_000}), "Unknown event type: xxx"),
    (json.dumps({"type": ["y" * 10_000] * 100}), "Unknown event type: ['yyy"),
])
def test_an_echoed_value_is_clipped(text, start):
    """A megabyte frame gets an error event of about a kilobyte: a client that never reads cannot
    make its queued events (up to OUTBOX_LIMIT of them) hold what it sent, a thousand times over."""
    err = parse_error(text)
    assert err.code == "unknown_event" and err.message.startswith(start), err.message[:100]
    assert len(err.message) <= MAX_MESSAGE_CHARS + 30 and err.message.endswith(" characters)"), err.message[-60:]
    assert len(dump(err.to_event())) < 1200
    huge = ProtocolError.model_not_found("m" * 100_000)
    assert huge.message.startswith("The model `mmm") and len(huge.message) <= MAX_MESSAGE_CHARS + 30
    short = "Unknown event type: " + "z" * (MAX_MESSAGE_CHARS - 20)  # exactly at the limit: unchanged
    assert ProtocolError("unknown_event", short).message == short


def test_other_error_table_rows_build_exact_messages():
    assert model_not_found_message("whisper-xl") == "The model `whisper-xl` does not exist."
    err = ProtocolError.model_not_found("whisper-xl")
    assert (err.code, err.message) == ("model_not_found", "The model `whisper-xl` does not exist.")
    err = ProtocolError("model_not_validated")
    assert err.message == MODEL_NOT_VALIDATED
    assert ProtocolError(ErrorCode.INVALID_AUDIO).message == "Invalid audio data"
    assert ProtocolError("buffer_full").message == "Audio buffer full"
    assert unknown_event_message(None) == "Unknown event type: None"
    assert ProtocolError.unknown_event("x").message == "Unknown event type: x"
    err = ProtocolError("processing_error", "engine exploded")
    assert (err.code, err.message, str(err)) == ("processing_error", "engine exploded", "engine exploded")


def test_error_codes_and_fixed_messages():
    assert {c.value for c in ErrorCode} == {
        "invalid_json", "unknown_event", "invalid_event", "model_not_found", "model_not_validated",
        "invalid_audio", "processing_error", "buffer_full", "idle_timeout", "invalid_frame",
        "server_busy", "server_shutdown",
    }
    assert MESSAGES[ErrorCode.INVALID_JSON] == "Invalid JSON"
    assert MESSAGES[ErrorCode.INVALID_EVENT] == "Missing required field: model"
    assert MESSAGES[ErrorCode.MODEL_NOT_VALIDATED] == MODEL_NOT_VALIDATED
    assert MESSAGES[ErrorCode.INVALID_AUDIO] == "Invalid audio data"
    assert MESSAGES[ErrorCode.BUFFER_FULL] == "Audio buffer full"
    for code in ("idle_timeout", "invalid_frame", "server_busy", "server_shutdown"):
        assert MESSAGES[ErrorCode(code)]  # chosen here, non-empty, one place
    # codes whose message carries a value have no fixed message
    for code in ("unknown_event", "model_not_found", "processing_error"):
        with pytest.raises(ValueError):
            ProtocolError(code)
    with pytest.raises(ValueError):
        ProtocolError("no_such_code", "x")


def test_module_level_code_aliases_and_error_event():
    import server.protocol as p

    for code in ErrorCode:
        assert getattr(p, code.name) is code and getattr(p, code.name) == code.value
    assert dump(error_event(p.BUFFER_FULL)) == '{"type":"error","error":"Audio buffer full","code":"buffer_full"}'
    assert dump(error_event("processing_error", "boom")) == (
        '{"type":"error","error":"boom","code":"processing_error"}'
    )
    with pytest.raises(ValueError):
        error_event(p.PROCESSING_ERROR)


def test_protocol_error_converts_to_error_event():
    event = ProtocolError("invalid_audio").to_event()
    assert isinstance(event, ErrorEvent)
    assert dump(event) == '{"type":"error","error":"Invalid audio data","code":"invalid_audio"}'
    event = ProtocolError.model_not_found("m").to_event()
    assert json.loads(dump(event)) == {
        "type": "error", "error": "The model `m` does not exist.", "code": "model_not_found"
    }


# ---------------------------------------------------------------- client events


def test_discriminated_union_picks_the_model_per_type():
    cases = [
        ({"type": "session.update", "model": "tiny.en"}, SessionUpdate),
        ({"type": "input_audio_buffer.append", "audio": "AAA="}, InputAudioBufferAppend),
        ({"type": "input_audio_buffer.commit"}, InputAudioBufferCommit),
        ({"type": "input_audio_buffer.clear"}, InputAudioBufferClear),
    ]
    for obj, cls in cases:
        event = parse_client_event(json.dumps(obj))
        assert type(event) is cls
        assert event.type == obj["type"]


def test_session_update_defaults_and_extensions():
    event = parse_client_event('{"type": "session.update", "model": "tiny.en"}')
    assert (event.model, event.language, event.prompt, event.task) == ("tiny.en", None, None, "transcribe")
    event = parse_client_event(json.dumps({
        "type": "session.update", "model": "m", "language": "de", "prompt": "Hallo", "task": "translate"
    }))
    assert (event.model, event.language, event.prompt, event.task) == ("m", "de", "Hallo", "translate")
    event = parse_client_event('{"type": "session.update", "model": "m", "language": null}')
    assert event.language is None
    # an empty model name parses; the caller answers model_not_found
    assert parse_client_event('{"type": "session.update", "model": ""}').model == ""


def test_extra_keys_are_accepted_and_ignored():
    event = parse_client_event(json.dumps({
        "type": "input_audio_buffer.commit", "event_id": "evt_1", "final": True, "foo": {"bar": [1]}
    }))
    assert event == InputAudioBufferCommit(final=True)
    assert not hasattr(event, "event_id")
    assert event.model_dump() == {"type": "input_audio_buffer.commit", "final": True}
    event = parse_client_event(json.dumps({
        "type": "session.update", "model": "m", "event_id": "e", "session": {"x": 1}, "temperature": 0.2
    }))
    assert event.model_dump() == {
        "type": "session.update", "model": "m", "language": None, "prompt": None, "task": "transcribe",
        "partials": False, "turn_detection": None, "word_timestamps": False,
    }
    assert parse_client_event('{"type": "input_audio_buffer.clear", "event_id": "e"}') == InputAudioBufferClear()


def test_turn_detection_extension():
    """``turn_detection`` (opt-in): OpenAI's server_vad fields with their defaults, echoed in
    session.updated only when set (vLLM's session.updated is unchanged without it)."""
    from server.protocol import SessionUpdated, dump

    event = parse_client_event(json.dumps({"type": "session.update", "model": "m",
                                           "turn_detection": {"type": "server_vad", "silence_duration_ms": 700,
                                                              "create_response": True}}))
    settings = event.turn_detection.settings()
    assert (settings.threshold, settings.prefix_padding_ms, settings.silence_duration_ms) == (0.5, 300, 700)
    assert json.loads(dump(SessionUpdated.from_update(event)))["turn_detection"] == {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 700}
    plain = parse_client_event('{"type": "session.update", "model": "m"}')
    assert "turn_detection" not in json.loads(dump(SessionUpdated.from_update(plain)))
    for bad in ({"type": "semantic_vad"}, {"threshold": 2}, "server_vad"):
        with pytest.raises(ProtocolError) as info:
            parse_client_event(json.dumps({"type": "session.update", "model": "m", "turn_detection": bad}))
        assert info.value.code == "processing_error"


@pytest.mark.parametrize(
    "raw, expected",
    [("true", True), ("false", False), ('"true"', True), ('"false"', False), ('"True"', True),
     ('"1"', True), ('"0"', False), ("1", True), ("0", False), ('"yes"', True), ('"off"', False)],
)
def test_commit_final_is_a_bool_as_vllm_parses_it(raw, expected):
    event = parse_client_event('{"type": "input_audio_buffer.commit", "final": %s}' % raw)
    assert event.final is expected


def test_commit_final_defaults_to_false():
    assert parse_client_event('{"type": "input_audio_buffer.commit"}').final is False


def test_client_events_are_immutable():
    event = parse_client_event('{"type": "input_audio_buffer.commit"}')
    with pytest.raises(ValidationError):
        event.final = True


# ---------------------------------------------------------------- audio payloads


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.parametrize("n", [2, 4, 6, 100, 4096, 32000])
def test_valid_even_payload_round_trips(n):
    data = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    assert len(data) == n
    assert decode_audio_payload(b64(data), max_bytes=32000) == data


def test_payload_exactly_at_the_cap_is_accepted():
    data = b"\x01\x02" * 500
    assert decode_audio_payload(b64(data), max_bytes=1000) == data
    assert decode_audio_payload(b64(b"\x00" * 4), max_bytes=5) == b"\x00" * 4


@pytest.mark.parametrize(
    "payload",
    [
        "",  # empty
        b64(b""),  # empty after decoding
        b64(b"\x00"),  # odd byte count
        b64(b"\x00\x01\x02"),  # odd byte count
        "AA",  # missing padding
        "A",
        "!!!!",  # outside the alphabet
        "AA AA==",  # whitespace is not tolerated (strict)
        b64(b"\x00\x01") + "\n",
        "AA-_",  # url-safe alphabet
        "QUJDé",  # non-ASCII
        "AA==AA==",  # data after padding
    ],
)
def test_bad_payloads_are_invalid_audio(payload):
    with pytest.raises(ProtocolError) as info:
        decode_audio_payload(payload, max_bytes=1 << 20)
    assert (info.value.code, info.value.message) == ("invalid_audio", "Invalid audio data")


@pytest.mark.parametrize("n, cap", [(1002, 1000), (4, 3), (6, 4), (32002, 32000)])
def test_oversize_payload_is_invalid_audio(n, cap):
    with pytest.raises(ProtocolError) as info:
        decode_audio_payload(b64(b"\x00" * n), max_bytes=cap)
    assert info.value.code == "invalid_audio"


def test_hugely_oversize_payload_is_rejected_without_decoding():
    # not even valid base64: the length check alone refuses it
    with pytest.raises(ProtocolError) as info:
        decode_audio_payload("!" * 10_000, max_bytes=100)
    assert info.value.code == "invalid_audio"


# ---------------------------------------------------------------- server events


def test_session_created_id_format_and_time():
    before = int(time.time())
    event = SessionCreated.new()
    after = int(time.time())
    assert re.fullmatch(r"sess-[0-9a-f]{16}", event.id)
    assert isinstance(event.created, int) and before <= event.created <= after
    assert SessionCreated.new().id != event.id
    assert dump(event) == f'{{"type":"session.created","id":"{event.id}","created":{event.created}}}'


def test_session_updated_json():
    event = SessionUpdated(model="tiny.en", language=None, prompt=None, task="transcribe")
    assert dump(event) == (
        '{"type":"session.updated","model":"tiny.en","language":null,"prompt":null,"task":"transcribe",'
        '"partials":false,"word_timestamps":false}'
    )
    update = parse_client_event(
        '{"type":"session.update","model":"m","language":"fr","prompt":"p","task":"translate","partials":true,'
        '"word_timestamps":true}'
    )
    assert dump(SessionUpdated.from_update(update)) == (
        '{"type":"session.updated","model":"m","language":"fr","prompt":"p","task":"translate","partials":true,'
        '"word_timestamps":true}'
    )


def test_transcription_partial_json():
    assert dump(TranscriptionPartial(text=" the next")) == '{"type":"transcription.partial","text":" the next"}'
    assert dump(TranscriptionPartial(text="")) == '{"type":"transcription.partial","text":""}'


def test_transcription_delta_json():
    assert dump(TranscriptionDelta(delta=" Hello")) == '{"type":"transcription.delta","delta":" Hello"}'
    assert dump(TranscriptionDelta(delta="")) == '{"type":"transcription.delta","delta":""}'
    # the word_timestamps extension: words (possibly none) only when asked for
    word = DeltaWord(word="Hello", start=0.52, end=0.9, probability=0.8712)
    assert dump(TranscriptionDelta(delta=" Hello", words=[word])) == (
        '{"type":"transcription.delta","delta":" Hello",'
        '"words":[{"word":"Hello","start":0.52,"end":0.9,"probability":0.8712}]}')
    assert dump(TranscriptionDelta(delta=" Hello", words=[])) == '{"type":"transcription.delta","delta":" Hello","words":[]}'


def test_transcription_done_json_and_usage_key_order():
    usage = Usage(prompt_tokens=10, total_tokens=15, completion_tokens=5)
    event = TranscriptionDone(text="Hello world.", usage=usage)
    assert dump(event) == (
        '{"type":"transcription.done","text":"Hello world.","usage":'
        '{"prompt_tokens":10,"total_tokens":15,"completion_tokens":5,"prompt_tokens_details":null}}'
    )
    assert list(json.loads(dump(event))["usage"]) == [
        "prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"
    ]
    assert Usage.from_counts(prompt_tokens=10, completion_tokens=5) == usage


def test_error_event_json():
    event = ErrorEvent(error="Invalid JSON", code="invalid_json")
    assert dump(event) == '{"type":"error","error":"Invalid JSON","code":"invalid_json"}'


def test_dump_keeps_non_ascii_text():
    text = "Grüße, 世界"
    assert json.loads(dump(TranscriptionDelta(delta=text)))["delta"] == text


def test_server_events_reject_unknown_fields():
    with pytest.raises(ValidationError):
        TranscriptionDelta(delta="x", extra=1)
