"""The REST API, API keys and metrics end to end: real server processes, the official ``openai`` SDK.

No mocks. Two servers, child processes on real tiny.en weights with the small test buckets:

* ``open_server``: ``jax-realtime serve`` without keys, ``max_upload_mb = 4``, word timestamps on:
  every response format, word timestamps, streaming, the offline comparison, every error case,
  models, health, metrics, and REST with realtime sessions on the one batcher.
* ``secured``: keys from every source at once (the config's ``api_keys`` and ``api_key_file``,
  ``--api-key``, an ``--api-key-file`` with two keys, ``$JAX_REALTIME_API_KEY``: the flags add to
  the config's keys, they do not replace them) and ``--request-timeout 8``: auth on REST and on the
  WebSocket handshake, the request timeout and the slow-upload timeout.

What "the same final text" means here (``test_realtime_gives_the_rest_text``): REST transcribes
the whole file at once; a realtime session transcribes while audio arrives.  When the session
receives the whole utterance before it decodes (all audio appended, then commit and final: what a
client replaying a file does), both decode the same audio in the same window with the same
model and must give the *identical* string.  When the audio is streamed at real-time pace the
session commits its text piece by piece (prefix-forced continuations), so casing and punctuation
at a commit boundary can legitimately differ: there the texts must be equal after Whisper's
English normaliser, on clips where the streaming policy is known to agree with offline decoding.
REST itself is checked against the engine's own offline transcription (``transcribe_batch``) of
the same decoded audio: identical text and segments, long-form included.

pytest has no asyncio plugin here: async parts run with :func:`harness.realtime_client.run`.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import io
import json
import math
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import encode_with_av, load_clip, load_refs
from harness.service_config import write_config
from jax_realtime.audio import decode_audio
from harness.evaluation import normalize, wer
from jax_realtime.longform import TranscribeOptions
from jax_realtime.transcribe import transcribe_batch
from harness.realtime_client import RealtimeClient, ServerProcess, check_done, run, stream_audio, to_pcm16, venv_script

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 900.0
BAD_AUDIO = "Invalid or unsupported audio file."
_STARTED: list[ServerProcess] = []

# --------------------------------------------------------------------------------------- clips

_REFS = {r["id"]: r for r in load_refs() if r["language"] == "en"}
SHORT = "ljspeech-LJ001-0016"  # 5.3 s
MEDIUM = "ljspeech-LJ001-0030"  # 6.9 s
LONG = "ljspeech-LJ001-0001"  # 9.7 s
TINY = "hifitts-6097-nada_lily_15_haggard_0182"  # 2.1 s


@functools.cache
def clip(clip_id: str) -> np.ndarray:
    return load_clip(_REFS[clip_id])


def ref_text(clip_id: str) -> str:
    return _REFS[clip_id]["text"]


def encode(audio: np.ndarray, fmt: str = "WAV", subtype: str = "PCM_16", rate: int = 16000) -> bytes:
    """``audio`` (float32, 16 kHz mono) as a file; written in 1 s blocks (libsndfile's Vorbis
    encoder crashes on one very large write)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1 if audio.ndim == 1 else audio.shape[1], format=fmt, subtype=subtype) as f:
        for i in range(0, len(audio), rate):
            f.write(audio[i:i + rate])
    return buf.getvalue()


@functools.cache
def wav(clip_id: str) -> bytes:
    return encode(clip(clip_id))


@functools.cache
def long_wav() -> tuple[bytes, np.ndarray]:
    """Every English clip back to back (~60 s: Whisper's long-form loop, several 30 s windows) as a
    PCM16 WAV, and the audio the server decodes from it."""
    pcm16 = np.concatenate([np.round(clip(c) * 32768).astype(np.int16) for c in _REFS])
    buf = io.BytesIO()
    sf.write(buf, pcm16, 16000, format="WAV", subtype="PCM_16")
    data = buf.getvalue()
    return data, decode_audio(data, "long.wav")


# ------------------------------------------------------------------------------------- servers


def rest_config(path: Path, model: str = "tiny.en", engine: dict | None = None, **server) -> Path:
    """The config of a REST test server: admission by measured load off (a fixed max_sessions,
    whatever the shared CPU measures)."""
    return write_config(path, engine={"model": model, **(engine or {})}, **{"admission_control": False, **server})


def start(tmp: Path, name: str, extra_args: list[str] | None = None, env: dict | None = None,
          model: str = "tiny.en", engine: dict | None = None, **server):
    config = rest_config(tmp / f"{name}.toml", model, engine, **server)
    proc = ServerProcess.serve(config, name=name, log_path=tmp / f"{name}.log", startup_timeout=STARTUP_TIMEOUT,
                               extra_args=extra_args, env={"JAX_REALTIME_API_KEY": "", **(env or {})})
    proc.start()
    _STARTED.append(proc)
    return proc


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    proc = start(tmp_path_factory.mktemp("rest"), "rest", engine={"word_timestamps": True}, max_upload_mb=4)
    yield proc
    proc.stop()


FLAG_KEY = "flag-" + secrets.token_hex(8)
ENV_KEY = "env-" + secrets.token_hex(8)
FILE_KEYS = ("file-" + secrets.token_hex(8), "file-" + secrets.token_hex(8))
CONFIG_KEY = "config-" + secrets.token_hex(8)
CONFIG_FILE_KEY = "config-file-" + secrets.token_hex(8)
ALL_KEYS = (FLAG_KEY, ENV_KEY) + FILE_KEYS + (CONFIG_KEY, CONFIG_FILE_KEY)
REQUEST_TIMEOUT = 8.0


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# API keys, one per line\n{FILE_KEYS[0]}\n\n   {FILE_KEYS[1]}   \n")
    config_key_file = tmp / "config-keys.txt"
    config_key_file.write_text(CONFIG_FILE_KEY + "\n")
    proc = start(tmp, "secured", extra_args=["--api-key", FLAG_KEY, "--api-key-file", str(key_file),
                                             "--request-timeout", str(REQUEST_TIMEOUT)],
                 env={"JAX_REALTIME_API_KEY": ENV_KEY}, api_keys=[CONFIG_KEY], api_key_file=str(config_key_file))
    yield proc
    proc.stop()


@pytest.fixture
def server(open_server):
    """The open server, checked alive after the test."""
    yield open_server
    assert open_server.alive(), open_server.log_tail()


def sdk(proc: ServerProcess, key: str = "no-key-needed") -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.http_url + "/v1", api_key=key, max_retries=0, timeout=300)


def transcribe(proc: ServerProcess, data: bytes, name: str = "clip.wav", key: str = "no-key-needed", **kwargs):
    return sdk(proc, key).audio.transcriptions.create(file=(name, data), model=kwargs.pop("model", "tiny.en"), **kwargs)


# -- raw HTTP (for what the SDK will not send: missing parts, chunked or stalled uploads) ---------------

def multipart(fields: dict | None = None, files: dict | None = None,
              boundary: str = "jaxrealtimeboundary") -> tuple[bytes, str]:
    parts = []
    for name, value in (fields or {}).items():
        for v in value if isinstance(value, list) else [value]:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode())
    for name, (filename, data) in (files or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(proc: ServerProcess, method: str, path: str, body=None, headers: dict | None = None,
            chunked: bool = False, timeout: float = 120.0) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(proc.host, proc.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post_form(proc: ServerProcess, fields: dict | None = None, files: dict | None = None,
              path: str = "/v1/audio/transcriptions", headers: dict | None = None):
    body, content_type = multipart(fields, files)
    return request(proc, "POST", path, body, {"Content-Type": content_type, **(headers or {})})


def assert_error(status: int, headers: dict, body: bytes, expected_status: int, type_: str,
                 param: str | None, message: str | re.Pattern | None = None) -> dict:
    """An OpenAI-style error body: exactly message/type/param/code, no traceback."""
    assert status == expected_status, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    parsed = json.loads(body)
    assert list(parsed) == ["error"] and set(parsed["error"]) == {"message", "type", "param", "code"}, parsed
    error = parsed["error"]
    assert error["type"] == type_ and error["param"] == param and error["code"] == expected_status, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"], error
    if isinstance(message, re.Pattern):
        assert message.fullmatch(error["message"]), error
    elif message is not None:
        assert error["message"] == message, error
    return error


# -- metrics ---------------------------------------------------------------------------------------

def scrape(proc: ServerProcess) -> dict[tuple, float]:
    """``GET /metrics`` parsed with prometheus-client's own parser: {(sample name, labels...): value}."""
    status, headers, body = request(proc, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain"), (status, headers)
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, *sorted(s.labels.items()))] = s.value
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


def compilations(proc: ServerProcess) -> float:
    return metric(scrape(proc), "jax_realtime_compilations_total")


# ===================================================================== response formats (SDK)


def test_every_response_format_carries_the_same_transcript(server):
    data, duration = wav(MEDIUM), len(clip(MEDIUM)) / 16000
    c = sdk(server)
    as_json = transcribe(server, data)
    assert isinstance(as_json, openai.types.audio.Transcription)
    text = as_json.text
    assert wer([ref_text(MEDIUM)], [text]) <= 20.0, text
    assert text == text.strip() and as_json.usage.type == "duration"
    assert as_json.usage.seconds == math.ceil(duration) == 7

    raw = c.audio.transcriptions.with_raw_response.create(file=("c.wav", data), model="tiny.en")
    assert raw.headers["content-type"] == "application/json"
    assert list(json.loads(raw.text)) == ["text", "usage"]

    assert transcribe(server, data, response_format="text") == text + "\n"

    srt = transcribe(server, data, response_format="srt")
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n(.+)\n", srt)
    assert cues and [int(c[0]) for c in cues] == list(range(1, len(cues) + 1)), srt
    assert " ".join(c[3] for c in cues) == text

    vtt = transcribe(server, data, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    vtt_cues = re.findall(r"(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)\n(.+)\n", vtt)
    assert [(a.replace(".", ","), b.replace(".", ","), t) for a, b, t in vtt_cues] == [c[1:] for c in cues]
    for fmt, expected in (("text", "text/plain"), ("srt", "text/plain"), ("vtt", "text/vtt")):
        raw = c.audio.transcriptions.with_raw_response.create(file=("c.wav", data), model="tiny.en",
                                                              response_format=fmt)
        assert raw.headers["content-type"].startswith(expected), (fmt, raw.headers)

    verbose = transcribe(server, data, response_format="verbose_json", timestamp_granularities=["segment"])
    assert isinstance(verbose, openai.types.audio.TranscriptionVerbose)
    assert verbose.text == text and verbose.language == "english" and verbose.duration == round(duration, 3)
    body = verbose.model_dump()
    assert body["task"] == "transcribe" and body["words"] is None
    assert body["usage"] == {"type": "duration", "seconds": 7}
    segments = verbose.segments
    assert [s.id for s in segments] == list(range(len(segments))) and len(segments) == len(cues)
    assert "".join(s.text for s in segments).strip() == text
    previous_end = 0.0
    for s, cue in zip(segments, cues):
        assert previous_end <= s.start < s.end <= duration + 0.02, segments
        previous_end = s.end
        for value in (s.start, s.end, s.temperature, s.avg_logprob, s.compression_ratio, s.no_speech_prob):
            assert isinstance(value, float), s
        assert s.temperature == 0.0 and s.seek == 0 and all(isinstance(t, int) for t in s.tokens)
        assert s.text.strip() == cue[3]
        h, m, rest = cue[1].split(":")
        assert float(rest.replace(",", ".")) == pytest.approx(s.start, abs=1e-3)


def test_rest_matches_the_engines_offline_transcription(server, tiny_engine):
    """REST runs the engine's long-form transcription on the batcher: identical text and segments to
    ``transcribe_batch`` on the same decoded audio, for one window and for ~60 s (several)."""
    short = wav(LONG)
    data, audio = long_wav()
    assert len(audio) / 16000 > 55
    offline_short = transcribe_batch(tiny_engine, [decode_audio(short, "s.wav")], TranscribeOptions())[0]
    offline_long = transcribe_batch(tiny_engine, [audio], TranscribeOptions())[0]
    for upload, offline in ((short, offline_short), (data, offline_long)):
        verbose = transcribe(server, upload, response_format="verbose_json")
        assert verbose.text == offline.text
        assert [(s.start, s.end, s.text) for s in verbose.segments] == \
            [(s.start, s.end, s.text) for s in offline.segments]
    assert offline_long.windows >= 3
    refs = [ref_text(c) for c in _REFS]
    assert wer([" ".join(refs)], [offline_long.text]) <= 25.0, offline_long.text


def check_words(words, segments, duration: float) -> None:
    """Words in order, never overlapping, each inside one segment, within the audio."""
    previous = 0.0
    for w in words:
        assert isinstance(w, openai.types.audio.TranscriptionWord) and w.word == w.word.strip() and w.word, w
        assert previous <= w.start <= w.end <= duration + 0.02, (previous, w)
        assert any(s.start <= w.start and w.end <= s.end for s in segments), (w, segments)
        previous = w.end
    for s in segments:  # a segment spans its words
        inside = [w for w in words if s.start <= w.start and w.end <= s.end]
        assert inside and s.start == inside[0].start and s.end == inside[-1].end, (s, inside)


def test_word_timestamps_with_the_openai_sdk(server, tiny_engine):
    """timestamp_granularities=["word"]: typed words (OpenAI's fields, plus probability) that spell
    the text, inside their segments; the same words as the engine's offline transcription; words
    of a ~60 s file carry their window's offset."""
    data, duration = wav(LONG), len(clip(LONG)) / 16000
    verbose = transcribe(server, data, response_format="verbose_json", timestamp_granularities=["word"])
    assert isinstance(verbose, openai.types.audio.TranscriptionVerbose)
    words = verbose.words
    assert len(words) >= 20 and " ".join(w.word for w in words) == verbose.text.strip()
    check_words(words, verbose.segments, duration)
    body = verbose.model_dump()
    assert set(body["words"][0]) == {"word", "start", "end", "probability"}
    assert all(0.0 < w["probability"] <= 1.0 for w in body["words"])
    offline = transcribe_batch(tiny_engine, [decode_audio(data, "c.wav")], TranscribeOptions(word_timestamps=True))[0]
    assert [(w.word, w.start, w.end) for w in words] == [(w.word.strip(), w.start, w.end) for w in offline.words]
    both = transcribe(server, data, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert both.words == words and both.segments == verbose.segments

    data, audio = long_wav()
    long = transcribe(server, data, response_format="verbose_json", timestamp_granularities=["word"])
    check_words(long.words, long.segments, len(audio) / 16000)
    assert len({s.seek for s in long.segments}) >= 3 and long.words[-1].end > 50


def test_stream_sends_a_chunk_per_window_then_done(server):
    """stream=true with ``stream_format=vllm`` (vLLM's shape) on ~60 s: several content chunks as
    windows finish, joined equal to the json text; then finish_reason "stop", the usage chunk, and
    (on the wire) ``data: [DONE]``.  (OpenAI's shape, the default: tests/test_openai_realtime.py.)"""
    data, _ = long_wav()
    text = transcribe(server, data).text
    stream = transcribe(server, data, stream=True, extra_body={"stream_include_usage": True, "stream_format": "vllm"})
    chunks = [chunk.model_dump() for chunk in stream]
    content = [c["choices"][0]["delta"]["content"] for c in chunks
               if c["choices"] and "finish_reason" not in c["choices"][0]]
    assert len(content) >= 2 and all(content), chunks
    assert "".join(content) == text
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"] == [{"delta": {"content": ""}, "finish_reason": "stop", "stop_reason": None}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 50
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("trsc-")
    assert all(c["object"] == "transcription.chunk" and c["model"] == "tiny.en" for c in chunks)

    # the wire: text/event-stream, "data: {...}" events, [DONE] last; no usage chunk unless asked
    form = {"model": "tiny.en", "stream": "true", "stream_format": "vllm"}
    status, headers, body = post_form(server, form, {"file": ("c.wav", wav(SHORT))})
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), (status, headers)
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", events
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] == "stop" and all("usage" not in p for p in payloads)
    assert "".join(p["choices"][0]["delta"]["content"] for p in payloads) == transcribe(server, wav(SHORT)).text


def test_temperature_prompt_and_language(server):
    """temperature 0 (default): greedy with Whisper's fallback; > 0: that one temperature. A prompt
    reaches the decoder (its tokens are counted in the usage); language "en" (or its name) is accepted."""
    data = wav(MEDIUM)
    for temperature, expected in ((None, 0.0), (0.0, 0.0), (0.6, 0.6)):
        kwargs = {} if temperature is None else {"temperature": temperature}
        verbose = transcribe(server, data, response_format="verbose_json", **kwargs)
        assert verbose.segments and {s.temperature for s in verbose.segments} == {expected}, (temperature, verbose)

    def usage(**kwargs):
        events = list(transcribe(server, data, stream=True, **kwargs))  # OpenAI's shape: usage in the done event
        return events[-1].usage.input_tokens

    assert usage(prompt="Roman character, Italy, Germany and France.") >= usage() + 10
    text = transcribe(server, data).text
    assert transcribe(server, data, language="en").text == text
    assert transcribe(server, data, language="English").text == text  # a name, any case, is the code


@pytest.mark.parametrize("kind", ["flac", "ogg", "mp3", "m4a", "webm"])
def test_common_audio_formats(server, kind):
    """The same speech in the containers clients send (44.1/48 kHz stereo for m4a/webm, decoded
    through FFmpeg): transcribed like the WAV (lossless: identical text)."""
    audio = clip(MEDIUM)
    stereo = np.stack([audio, 0.5 * audio], axis=1)
    data = {
        "flac": lambda: encode(audio, "FLAC", "PCM_16"),
        "ogg": lambda: encode(audio, "OGG", "VORBIS"),
        "mp3": lambda: encode(audio, "MP3", "MPEG_LAYER_III"),
        "m4a": lambda: encode_with_av(stereo, "mp4", "aac", 44100),
        "webm": lambda: encode_with_av(stereo, "webm", "libopus", 48000),
    }[kind]()
    text = transcribe(server, data, name=f"clip.{kind}").text
    reference = transcribe(server, wav(MEDIUM)).text
    if kind == "flac":
        assert text == reference
    else:
        assert wer([reference], [text]) <= 10.0, (reference, text)


# ========================================================================== errors


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations.create
def test_error_cases(server):
    """Every bad input gets an OpenAI-style error with the right status, never a 500."""
    good = {"file": ("clip.wav", wav(TINY))}
    cases = [
        # (fields, files, path, status, type, param, message)
        ({"model": "tiny.en"}, {}, None, 400, "BadRequestError", "file", "Missing required parameter: 'file'."),
        ({"model": "tiny.en"}, {"file": ("empty.wav", b"")}, None, 400, "BadRequestError", "file", BAD_AUDIO),
        ({"model": "tiny.en"}, {"file": ("noise.wav", b"RIFF" + secrets.token_bytes(4000))}, None, 400,
         "BadRequestError", "file", BAD_AUDIO),
        ({"model": "tiny.en"}, {"file": ("clip.m4a", b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(2000))}, None, 400,
         "BadRequestError", "file", BAD_AUDIO),
        ({"model": "tiny.en"}, {"file": ("cut.wav", wav(TINY)[:30])}, None, 400, "BadRequestError", "file",
         BAD_AUDIO),
        ({"model": "whisper-1"}, good, None, 404, "NotFoundError", "model", "The model `whisper-1` does not exist."),
        ({"model": "tiny.en", "response_format": "xml"}, good, None, 400, "BadRequestError", "response_format",
         re.compile(r"response_format: Input should be 'json', 'text', 'srt', 'verbose_json' or 'vtt'")),
        ({"model": "tiny.en", "language": "de"}, good, None, 400, "BadRequestError", "language",
         "Language 'de' is not supported by an English-only model."),
        ({"model": "tiny.en", "language": "klingon"}, good, None, 400, "BadRequestError", "language", None),
        ({"model": "tiny.en", "timestamp_granularities[]": ["segment", "word"]}, good, None, 400, "BadRequestError",
         "timestamp_granularities", "timestamp_granularities[]=word needs response_format 'verbose_json'."),
        ({"model": "tiny.en", "timestamp_granularities[]": "sentence"}, good, None, 400, "BadRequestError",
         "timestamp_granularities", None),
        ({"model": "tiny.en", "temperature": "1.5"}, good, None, 400, "BadRequestError", "temperature", None),
        ({"model": "tiny.en", "temperature": "warm"}, good, None, 400, "BadRequestError", "temperature", None),
        ({"model": "tiny.en", "stream": "maybe"}, good, None, 400, "BadRequestError", "stream", None),
        ({"model": "tiny.en", "stream": "true", "response_format": "srt"}, good, None, 400, "BadRequestError",
         "response_format", "stream=true supports response_format json or text, not 'srt'."),
        ({"model": "tiny.en"}, good, "/v1/audio/translations", 400, "BadRequestError", "model",
         re.compile(r"The model `tiny.en` is English-only and cannot translate.*")),
    ]
    for fields, files, path, status, type_, param, message in cases:
        got = post_form(server, fields, files, path=path or "/v1/audio/transcriptions")
        assert_error(*got, status, type_, param, message)

    # not a multipart form at all
    got = request(server, "POST", "/v1/audio/transcriptions", b'{"model": "tiny.en"}',
                  {"Content-Type": "application/json"})
    assert_error(*got, 400, "BadRequestError", "file")
    # routes and methods
    assert_error(*request(server, "GET", "/v1/nothing"), 404, "NotFoundError", None, "Not found.")
    status, headers, body = request(server, "GET", "/v1/audio/transcriptions")
    assert_error(status, headers, body, 405, "MethodNotAllowedError", None)
    assert "POST" in headers["allow"]
    assert_error(*request(server, "GET", "/v1/models/whisper-1"), 404, "NotFoundError", "model")

    # the SDK's view: the exception class OpenAI clients catch
    with pytest.raises(openai.NotFoundError) as info:
        transcribe(server, wav(TINY), model="whisper-large-v9")
    assert info.value.body["message"] == "The model `whisper-large-v9` does not exist."
    with pytest.raises(openai.BadRequestError) as info:
        sdk(server).audio.translations.create(file=("c.wav", wav(TINY)), model="tiny.en")
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        transcribe(server, b"not audio", name="clip.mp3")

    # and the server still transcribes
    assert transcribe(server, wav(TINY)).text


def test_upload_over_the_cap(server):
    """max_upload_mb = 4: a larger body is refused with a 400, declared or chunked."""
    big = encode(np.zeros(16000 * 140, np.float32))  # 140 s of PCM16: 4.3 MiB
    assert len(big) > 4 * 1024 * 1024
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(server, big)
    assert info.value.status_code == 400 and info.value.body["param"] == "file"
    assert info.value.body["message"].startswith("Maximum file size exceeded")

    body, content_type = multipart({"model": "tiny.en"}, {"file": ("big.wav", big)})
    pieces = (body[i:i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: chunked
    got = request(server, "POST", "/v1/audio/transcriptions", pieces, {"Content-Type": content_type}, chunked=True)
    assert_error(*got, 400, "BadRequestError", "file", re.compile(r"Maximum file size exceeded.*4 MiB\."))

    # just under the cap is fine
    fits = encode(np.zeros(16000 * 120, np.float32))
    assert len(fits) > 3.5 * 1024 * 1024
    assert isinstance(transcribe(server, fits), openai.types.audio.Transcription)


# =================================================================== models, health, metrics


def test_models_and_health(server):
    health = server.health()
    assert health["status"] == "ok"
    # /health answered 200 only once warm: by its first answer every bucket was compiled
    assert server.startup_health["compile"]["compilations"] >= server.startup_health["buckets"] == 8
    models = sdk(server).models.list()
    assert [m.id for m in models.data] == health["models"] and "tiny.en" in health["models"]
    assert all(m.object == "model" and m.owned_by == "jax-realtime" for m in models.data)
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["object"] == "list"
    assert sdk(server).models.retrieve("openai/whisper-tiny.en").id == "openai/whisper-tiny.en"


def test_metrics_parse_and_move(server):
    before = scrape(server)
    names = {k[0] for k in before}
    for name in ("jax_realtime_sessions", "jax_realtime_queue_depth", "jax_realtime_batch_occupancy",
                 "jax_realtime_engine_step_seconds_bucket", "jax_realtime_first_delta_latency_seconds_count",
                 "jax_realtime_delta_latency_seconds_count", "jax_realtime_final_latency_seconds_count",
                 "jax_realtime_compilations_total", "jax_realtime_utterances_total",
                 "jax_realtime_audio_seconds_total", "jax_realtime_batch_rows_total"):
        assert name in names, name

    seconds = len(clip(SHORT)) / 16000
    assert transcribe(server, wav(SHORT)).text
    record = run(stream_audio(server.ws_url, to_pcm16(clip(SHORT)), "tiny.en", speed=4.0))
    assert record.ok and record.done_text, record.as_dict()
    run(server.wait_sessions(0))
    after = scrape(server)

    def moved(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("jax_realtime_http_requests_total", endpoint="transcriptions", status="200") == 1
    assert moved("jax_realtime_http_request_duration_seconds_count", endpoint="transcriptions") == 1
    assert moved("jax_realtime_audio_seconds_total", source="rest") == pytest.approx(seconds, abs=1e-3)
    assert moved("jax_realtime_audio_seconds_total", source="realtime") == pytest.approx(seconds, abs=1e-3)
    assert moved("jax_realtime_sessions_opened_total") == 1
    assert moved("jax_realtime_utterances_total", outcome="done") == 1
    assert moved("jax_realtime_final_latency_seconds_count") == 1
    assert moved("jax_realtime_first_delta_latency_seconds_count") == 1
    assert moved("jax_realtime_delta_latency_seconds_count") == len([d for _, d in record.deltas if d])
    steps = moved("jax_realtime_batches_total")
    assert steps >= 2 and moved("jax_realtime_engine_step_seconds_count") == steps
    assert moved("jax_realtime_engine_step_seconds_sum") > 0
    assert moved("jax_realtime_batch_rows_total", kind="request") >= steps
    assert 0 < metric(after, "jax_realtime_batch_occupancy") <= 1
    assert metric(after, "jax_realtime_sessions") == 0 and metric(after, "jax_realtime_queue_depth") == 0
    assert moved("jax_realtime_compilations_total") == 0
    assert metric(after, "jax_realtime_model_info", model="tiny.en") == 1


# ============================================================ REST and realtime, one batcher


@pytest.mark.parametrize("clip_id", [SHORT, MEDIUM, LONG])
def test_realtime_gives_the_rest_text(server, clip_id):
    """The same audio through REST and /v1/realtime: the same words when the session has the whole
    utterance before it decodes (see the module docstring).  Words, not characters: a realtime
    session levels its audio as it arrives (audio.Leveller), which may move a comma."""
    rest_text = transcribe(server, wav(clip_id)).text

    async def main():
        async with await RealtimeClient.connect(server.ws_url) as c:
            await c.update("tiny.en")
            await c.append(to_pcm16(clip(clip_id)))
            await c.commit()
            await c.commit(final=True)
            return check_done(*await c.until_done())

    assert normalize(run(main())) == normalize(rest_text)


def test_realtime_paced_stream_gives_the_rest_text(server):
    """Streamed at twice real time in 100 ms appends, the text is committed in pieces: equal to
    REST's after Whisper's normaliser (see the module docstring)."""
    for clip_id in (SHORT, MEDIUM):
        record = run(stream_audio(server.ws_url, to_pcm16(clip(clip_id)), "tiny.en", speed=2.0))
        assert record.ok and len([d for _, d in record.deltas if d]) >= 2, record.as_dict()
        assert normalize(record.done_text) == normalize(transcribe(server, wav(clip_id)).text)


def test_rest_and_realtime_share_one_batcher(server):
    """Long-form REST, short REST and realtime sessions at once: all correct, all on the one batcher
    (its request rows count every window), and nothing compiled."""
    data, audio = long_wav()
    before = scrape(server)
    c = sdk(server)

    async def rest(upload: bytes, **kwargs):
        return await asyncio.to_thread(c.audio.transcriptions.create, file=("a.wav", upload), model="tiny.en",
                                       response_format="verbose_json", **kwargs)

    async def main():
        return await asyncio.gather(
            rest(data), rest(wav(SHORT)), rest(wav(MEDIUM)),
            stream_audio(server.ws_url, to_pcm16(clip(LONG)), "tiny.en", speed=2.0),
            stream_audio(server.ws_url, to_pcm16(clip(MEDIUM)), "tiny.en", speed=0),
        )

    long_form, short, medium, live_long, live_medium = run(main(), timeout=600)
    after = scrape(server)
    assert wer([" ".join(ref_text(i) for i in _REFS)], [long_form.text]) <= 25.0, long_form.text
    assert wer([ref_text(SHORT), ref_text(MEDIUM)], [short.text, medium.text]) <= 20.0
    assert live_long.ok and live_medium.ok, (live_long.as_dict(), live_medium.as_dict())
    assert wer([ref_text(LONG), ref_text(MEDIUM)], [live_long.done_text, live_medium.done_text]) <= 25.0
    rows = metric(after, "jax_realtime_batch_rows_total", kind="request") - \
        metric(before, "jax_realtime_batch_rows_total", kind="request")
    rest_windows = len({s.seek for s in long_form.segments}) + 2
    assert rows >= rest_windows + 2, rows  # every REST window and at least one decode per session
    assert metric(after, "jax_realtime_compilations_total") == metric(before, "jax_realtime_compilations_total")
    assert metric(after, "jax_realtime_queue_depth") == 0


# ======================================================================== API keys


def test_rest_requires_a_key(secured):
    for key in ("wrong-key", FLAG_KEY[:-1], FLAG_KEY + "x"):
        with pytest.raises(openai.AuthenticationError) as info:
            sdk(secured, key).models.list()
        assert info.value.status_code == 401 and info.value.body["type"] == "AuthenticationError"
    # no header, another scheme, the key without a scheme: 401 with WWW-Authenticate, on every /v1/ route
    for headers in ({}, {"Authorization": f"Basic {FLAG_KEY}"}, {"Authorization": FLAG_KEY}):
        status, got_headers, body = request(secured, "GET", "/v1/models", headers=headers)
        assert_error(status, got_headers, body, 401, "AuthenticationError", None)
        assert got_headers["www-authenticate"].startswith("Bearer")
        assert_error(*post_form(secured, {"model": "tiny.en"}, {"file": ("c.wav", wav(TINY))}, headers=headers),
                     401, "AuthenticationError", None)
    # every configured key works: flag, environment, both lines of the flag's file, the config's key and file
    for key in ALL_KEYS:
        assert [m.id for m in sdk(secured, key).models.list()][0] == "tiny.en"
    request_headers = {"Authorization": f"bearer {FILE_KEYS[1]}"}  # the scheme is case-insensitive
    assert request(secured, "GET", "/v1/models", headers=request_headers)[0] == 200
    assert wer([ref_text(TINY)], [transcribe(secured, wav(TINY), key=ENV_KEY).text]) <= 20.0
    # this server's engine has no word timestamps: asking for them is a 400 that says how to enable them
    got = post_form(secured, {"model": "tiny.en", "response_format": "verbose_json", "timestamp_granularities[]": "word"},
                    {"file": ("c.wav", wav(TINY))}, headers={"Authorization": f"Bearer {FLAG_KEY}"})
    assert_error(*got, 400, "BadRequestError", "timestamp_granularities",
                 re.compile(r"Word-level timestamps are not enabled on this server.*"))
    # health and metrics stay open for load balancers and Prometheus
    assert request(secured, "GET", "/health")[0] == 200 and request(secured, "GET", "/metrics")[0] == 200
    samples = scrape(secured)
    assert metric(samples, "jax_realtime_http_requests_total", endpoint="transcriptions", status="401") >= 3


def test_websocket_handshake_requires_a_key(secured):
    """Without a valid key the upgrade is answered with HTTP 401 before any event; with one of the
    keys the session works."""

    async def refused(headers):
        with pytest.raises(InvalidStatus) as info:
            async with connect(secured.ws_url, additional_headers=headers, open_timeout=30):
                pass
        response = info.value.response
        assert response.status_code == 401
        assert json.loads(bytes(response.body))["error"]["type"] == "AuthenticationError"

    async def main():
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {ENV_KEY}"}):
            await refused(headers)
        assert (await secured.ahealth())["sessions"] == 0
        for key in (FLAG_KEY, FILE_KEYS[0]):
            client = await RealtimeClient.connect(secured.ws_url, additional_headers={"Authorization": f"Bearer {key}"})
            async with client:
                assert client.created["id"].startswith("sess-")
                await client.update("tiny.en")
                deltas, done = await client.transcribe(to_pcm16(clip(TINY)))
                assert wer([ref_text(TINY)], [check_done(deltas, done)]) <= 20.0

    run(main())


def test_websocket_key_as_subprotocol(secured, server):
    """Browsers cannot send headers on a WebSocket: the key may come as the subprotocol
    ``openai-insecure-api-key.<key>`` beside ``realtime`` (OpenAI's browser clients), and the
    accepted handshake names ``realtime`` (a browser fails one that names none it offered; the key
    is never echoed).  A wrong key, or ``realtime`` alone, is refused with 401 before any event.
    Without keys configured, ``realtime`` is accepted and echoed too."""

    def offered(key: str | None) -> list[str]:
        return ["realtime"] + ([f"openai-insecure-api-key.{key}"] if key is not None else [])

    async def refused(protocols):
        with pytest.raises(InvalidStatus) as info:
            async with connect(secured.ws_url, subprotocols=protocols, open_timeout=30):
                pass
        assert info.value.response.status_code == 401

    async def main():
        for protocols in (offered(None), offered("nope"), offered(FLAG_KEY + "x"), [f"realtime.{ENV_KEY}"]):
            await refused(protocols)
        assert (await secured.ahealth())["sessions"] == 0
        for key in (ENV_KEY, FILE_KEYS[1]):
            client = await RealtimeClient.connect(secured.ws_url, subprotocols=offered(key))
            async with client:
                assert client.ws.subprotocol == "realtime"
                assert key not in str(client.ws.response.headers)
                await client.update("tiny.en")
                deltas, done = await client.transcribe(to_pcm16(clip(TINY)))
                assert wer([ref_text(TINY)], [check_done(deltas, done)]) <= 20.0
        # a wrong key in the subprotocol does not undo a valid Authorization header
        client = await RealtimeClient.connect(secured.ws_url, subprotocols=offered("nope"),
                                              additional_headers={"Authorization": f"Bearer {FLAG_KEY}"})
        async with client:
            assert client.ws.subprotocol == "realtime"
        async with await RealtimeClient.connect(server.ws_url, subprotocols=offered(None)) as client:
            assert client.ws.subprotocol == "realtime"
            await client.update("tiny.en")

    run(main())


def test_request_timeout_drops_the_work(secured):
    """--request-timeout 8: twenty minutes of speech cannot be transcribed in time on this CPU;
    the answer is a 504 at the deadline, and the rest of its windows never reach the engine."""
    audio = np.tile(long_wav()[1], 20)  # ~20 minutes, ~40 windows
    data = encode(audio, "OGG", "VORBIS")
    assert len(data) < 25 * 1024 * 1024
    before = scrape(secured)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        transcribe(secured, data, name="long.ogg", key=FLAG_KEY)
    elapsed = time.monotonic() - started
    assert info.value.status_code == 504 and info.value.body["type"] == "TimeoutError", info.value.body
    assert REQUEST_TIMEOUT - 1 <= elapsed <= REQUEST_TIMEOUT + 10, elapsed
    time.sleep(3)  # the window already on the device finishes; nothing follows it
    steps = metric(scrape(secured), "jax_realtime_batches_total")
    time.sleep(3)
    after = scrape(secured)
    assert metric(after, "jax_realtime_batches_total") == steps
    assert steps - metric(before, "jax_realtime_batches_total") < 40
    assert metric(after, "jax_realtime_queue_depth") == 0
    assert transcribe(secured, wav(TINY), key=FLAG_KEY).text  # and the server is fine


def test_stalled_upload_times_out(secured):
    """A body that stops arriving is answered with a 408 after the request timeout."""
    body, content_type = multipart({"model": "tiny.en"}, {"file": ("c.wav", wav(SHORT))})
    with socket.create_connection((secured.host, secured.port), timeout=60) as sock:
        head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {secured.host}\r\n"
                f"Authorization: Bearer {FLAG_KEY}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        started = time.monotonic()
        sock.sendall(head + body[: len(body) // 2])
        response = http.client.HTTPResponse(sock)
        response.begin()
        elapsed = time.monotonic() - started
        got = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    assert_error(*got, 408, "RequestTimeoutError", None,
                 f"The request body did not arrive within {REQUEST_TIMEOUT:g} s.")
    assert REQUEST_TIMEOUT - 1 <= elapsed <= REQUEST_TIMEOUT + 10, elapsed


@pytest.mark.parametrize("args,env,message", [
    (["--api-key-file", "/nonexistent/keys.txt"], {}, "api_key_file /nonexistent/keys.txt: cannot read"),
    (["--api-key", "two words"], {}, "api_keys: Value error, key 1: an API key may only hold visible ASCII"),
    ([], {"JAX_REALTIME_API_KEY": "ok-key,has space"}, "$JAX_REALTIME_API_KEY: an API key may only hold"),
])
def test_bad_keys_stop_the_server_at_start(tmp_path, args, env, message):
    """A key that cannot be used fails ``serve`` at once (exit 2, the source named, the key not shown)."""
    import os

    config = write_config(tmp_path / "c.toml")
    result = subprocess.run([venv_script("jax-realtime"), "serve", "--config", str(config), "--port", "1", *args],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr, result.stderr
    assert "two words" not in result.stderr and "has space" not in result.stderr


# ==================================================================== translation (multilingual)

# What base's greedy translation of each FLEURS clip must mention (its source language, its words),
# and the language hint sent with it (None: detected).
TRANSLATIONS = {
    "fleurs-de-001": ("german", {"dinosaur", "water"}, "German"),
    "fleurs-es-001": ("spanish", {"analytical", "critical", "perspectives"}, None),
}


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory):
    """A third server, on the multilingual base model (installed by the test extra): the only way
    to check that /v1/audio/translations really translates (tiny.en refuses it), and word alignment
    with a detected language in the start sequence. ~65 s to start with a cold compilation cache on
    2 cores."""
    proc = start(tmp_path_factory.mktemp("base"), "base", model="base", model_names=["base", "whisper-1"],
                 engine={"word_timestamps": True})
    yield proc
    proc.stop()


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK marks translations.create
def test_translations_on_a_multilingual_model(multilingual):
    """German and Spanish speech: translations answer in English (the source language detected, or
    hinted, and reported), a transcription in the source language; a language the model does not
    have is a 400."""
    c = sdk(multilingual)
    refs = {r["id"]: r for r in load_refs()}

    def speech(clip_id: str) -> bytes:
        return (Path(__file__).parent / "data" / refs[clip_id]["wav"]).read_bytes()

    for clip_id, (language, words, hint) in TRANSLATIONS.items():
        translated = c.audio.translations.create(  # the SDK has no language for translations: a form field
            file=("speech.wav", speech(clip_id)), model="whisper-1", response_format="verbose_json",
            extra_body={"language": hint} if hint else None)
        body = translated.model_dump()
        assert body["task"] == "translate" and translated.language == language, body
        assert words <= set(normalize(translated.text).split()), (clip_id, translated.text)
    # the same German speech transcribed: German, detected
    source = c.audio.transcriptions.create(file=("speech.wav", speech("fleurs-de-001")), model="base",
                                           response_format="verbose_json", timestamp_granularities=["word"])
    assert source.language == "german" and source.model_dump()["task"] == "transcribe"
    # words as Whisper splits them ("T-Rex": " T" then "-Rex"): together, the text without its spaces
    assert "".join(w.word for w in source.words) == source.text.replace(" ", "")
    check_words(source.words, source.segments, source.duration)
    assert wer([refs["fleurs-de-001"]["text"]], [source.text]) <= 50.0, source.text
    assert not {"dinosaur", "water"} & set(normalize(source.text).split()), source.text  # not English
    with pytest.raises(openai.BadRequestError) as info:  # the SDK's extra_body does reach the form
        c.audio.translations.create(file=("c.wav", wav(TINY)), model="base", extra_body={"language": "klingon"})
    assert info.value.body["param"] == "language"
    got = post_form(multilingual, {"model": "base", "language": "klingon"}, {"file": ("c.wav", wav(TINY))},
                    path="/v1/audio/translations")
    assert_error(*got, 400, "BadRequestError", "language", "Language 'klingon' is not supported by this model.")
    assert_error(*post_form(multilingual, {"model": "tiny.en"}, {"file": ("c.wav", wav(TINY))}), 404,
                 "NotFoundError", "model")


# ============================================================================ after everything


def test_zz_no_compilation_after_warmup(open_server, secured, multilingual):
    """Runs last: no server compiled anything while serving the tests above."""
    for proc in (open_server, secured, multilingual):
        assert proc.alive(), proc.log_tail()
        assert proc.health()["compile"]["compilations"] == proc.baseline_compilations, proc.name
