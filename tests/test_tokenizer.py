"""The Whisper tokenizer on the real tiny.en (English-only) and base (multilingual) vocabularies.

Special ids are checked against the documented Whisper values and the raw ``tokenizers`` file,
suppression lists against faster-whisper's own helpers.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tokenizers

from jax_realtime.audio import TIME_PRECISION
from jax_realtime.tokenizer import LANGUAGES, TokenizerError, WhisperTokenizer
from jax_realtime.weights import CheckpointError, resolve

TINY_EN_IDS = {
    "eot": 50256, "sot": 50257, "translate": 50357, "transcribe": 50358, "sot_lm": 50359,
    "sot_prev": 50360, "no_speech": 50361, "no_timestamps": 50362, "timestamp_begin": 50363,
}
BASE_IDS = {k: v + 1 for k, v in TINY_EN_IDS.items()}
SPECIAL_NAMES = {
    "eot": "<|endoftext|>", "sot": "<|startoftranscript|>", "translate": "<|translate|>",
    "transcribe": "<|transcribe|>", "sot_lm": "<|startoflm|>", "sot_prev": "<|startofprev|>",
    "no_speech": "<|nocaptions|>", "no_timestamps": "<|notimestamps|>",
}


def _tokenizer_file(name: str) -> str:
    try:
        return resolve(name).tokenizer_file
    except CheckpointError as exc:
        pytest.skip(f"{name} weights are not installed: {exc}")


@pytest.fixture(scope="module")
def tiny_en() -> WhisperTokenizer:
    return WhisperTokenizer(_tokenizer_file("tiny.en"), multilingual=False)


@pytest.fixture(scope="module")
def base() -> WhisperTokenizer:
    return WhisperTokenizer(_tokenizer_file("base"), multilingual=True)


@pytest.fixture(params=["tiny.en", "base"])
def model(request):
    """(name, our tokenizer, multilingual, expected ids) for each model."""
    name = request.param
    tok = request.getfixturevalue("tiny_en" if name == "tiny.en" else "base")
    return name, tok, name == "base", TINY_EN_IDS if name == "tiny.en" else BASE_IDS


@functools.lru_cache(maxsize=None)
def _raw(path: str) -> tokenizers.Tokenizer:
    """The tokenizer.json loaded directly with the ``tokenizers`` library."""
    return tokenizers.Tokenizer.from_file(path)


def _faster_whisper(tok: WhisperTokenizer, multilingual: bool, task="transcribe", language="en"):
    from faster_whisper.tokenizer import Tokenizer

    return Tokenizer(_raw(tok.path), multilingual, task=task, language=language)


# -- special ids ---------------------------------------------------------------------------------

def test_special_ids(model):
    _, tok, _, expected = model
    for attr, value in expected.items():
        assert getattr(tok, attr) == value, attr


def test_special_ids_are_the_named_tokens(model):
    _, tok, _, _ = model
    raw = _raw(tok.path)
    for attr, token in SPECIAL_NAMES.items():
        assert raw.id_to_token(getattr(tok, attr)) == token, attr
    assert tok.timestamp_begin == tok.no_timestamps + 1


def test_special_ids_match_faster_whisper(model):
    _, tok, multilingual, _ = model
    ref = _faster_whisper(tok, multilingual)
    for attr in ("eot", "sot", "translate", "transcribe", "sot_lm", "sot_prev", "no_speech", "no_timestamps",
                 "timestamp_begin"):
        assert getattr(tok, attr) == getattr(ref, attr), attr


def test_language_ids(tiny_en, base):
    assert tiny_en.language_ids == {}
    assert base.language_ids["en"] == 50259
    assert base.language_ids["de"] == 50261
    raw = _raw(base.path)
    for code, token_id in base.language_ids.items():
        assert raw.id_to_token(token_id) == f"<|{code}|>"
    # contiguous, in LANGUAGES order, between <|startoftranscript|> and <|translate|>
    ids = list(base.language_ids.values())
    assert ids == list(range(base.sot + 1, base.translate))
    assert list(base.language_ids) == list(LANGUAGES)[: len(ids)]
    assert len(ids) == 99  # base predates <|yue|> (large-v3)


# -- suppression ---------------------------------------------------------------------------------

def test_suppress_tokens_match_faster_whisper(model):
    from faster_whisper.transcribe import get_suppressed_tokens

    _, tok, multilingual, _ = model
    ref = _faster_whisper(tok, multilingual)
    assert tok.suppress_tokens == tuple(get_suppressed_tokens(ref, [-1]))
    assert tok.non_speech_tokens == tuple(ref.non_speech_tokens)
    assert list(tok.suppress_tokens) == sorted(set(tok.suppress_tokens))
    for special in (tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech, tok.transcribe, tok.translate):
        assert special in tok.suppress_tokens
    for allowed in (tok.eot, tok.no_timestamps, tok.timestamp_begin):
        assert allowed not in tok.suppress_tokens


def test_suppress_tokens_for_multilingual_tasks_match_faster_whisper(base):
    """The list does not depend on the task/language faster-whisper's tokenizer is built for."""
    from faster_whisper.transcribe import get_suppressed_tokens

    for task, language in [("translate", "de"), ("transcribe", "fr"), ("transcribe", "ja")]:
        ref = _faster_whisper(base, True, task=task, language=language)
        assert base.suppress_tokens == tuple(get_suppressed_tokens(ref, [-1]))


def test_suppress_blank(model):
    _, tok, _, _ = model
    assert tok.suppress_blank == (220, tok.eot)
    raw = _raw(tok.path)
    assert raw.encode(" ", add_special_tokens=False).ids == [220]


# -- text ----------------------------------------------------------------------------------------

TEXTS = [
    " Hello world.",
    "Printing, in the only sense with which we are at present concerned,",
    " It's 3.5 o'clock — naïve café, 100% sure!",
    "  double  spaces and\nnew lines\t",
    " 東京 und Größe: ça va? ¿Qué tal?",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(model, text):
    _, tok, multilingual, _ = model
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.eot for i in ids)
    assert tok.decode(ids) == text
    ref = _faster_whisper(tok, multilingual)
    assert ids == ref.encode(text)


def test_encode_empty(model):
    _, tok, _, _ = model
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_decode_drops_special_and_timestamp_ids(model):
    _, tok, multilingual, _ = model
    text = " The quick brown fox."
    ids = tok.encode(text)
    start = [tok.sot, tok.transcribe, tok.no_timestamps, tok.timestamp_begin]
    if multilingual:
        start.insert(1, tok.language_ids["en"])
    noisy = start + ids[:2] + [tok.timestamp_begin + 75, tok.timestamp_begin + 75] + ids[2:]
    noisy += [tok.timestamp_begin + 1500, tok.eot, tok.no_speech, tok.sot_lm]
    assert tok.decode(noisy) == text
    assert tok.decode(np.array(noisy, dtype=np.int32)) == text
    assert tok.decode(noisy) == _faster_whisper(tok, multilingual).decode(noisy)


def test_timestamps(model):
    _, tok, _, _ = model
    b = tok.timestamp_begin
    assert tok.timestamp_seconds(b) == 0.0
    assert tok.timestamp_seconds(b + 1) == pytest.approx(0.02)
    assert tok.timestamp_seconds(b + 50) == pytest.approx(1.0)
    assert tok.timestamp_seconds(b + 1500) == pytest.approx(30.0)
    assert TIME_PRECISION == pytest.approx(0.02)
    assert tok.is_timestamp(b) and tok.is_timestamp(b + 1500)
    assert not tok.is_timestamp(tok.no_timestamps) and not tok.is_timestamp(tok.eot)


# -- start-of-transcript sequences ---------------------------------------------------------------

def test_sot_sequence_english_only(tiny_en):
    sot = tiny_en.sot
    assert tiny_en.sot_sequence(None, "transcribe") == [sot]
    assert tiny_en.sot_sequence("en", "transcribe") == [sot]
    assert tiny_en.sot_sequence("EN", "transcribe") == [sot]
    assert tiny_en.sot_sequence("en", "transcribe") == _faster_whisper(tiny_en, False).sot_sequence


def test_sot_sequence_english_only_rejects_translate_and_other_languages(tiny_en):
    with pytest.raises(ValueError, match="translate"):
        tiny_en.sot_sequence(None, "translate")
    with pytest.raises(ValueError, match="translate"):
        tiny_en.sot_sequence("en", "translate")
    with pytest.raises(ValueError, match="'fr'"):
        tiny_en.sot_sequence("fr", "transcribe")


@pytest.mark.parametrize("task", ["transcribe", "translate"])
@pytest.mark.parametrize("language", ["en", "de", "fr", "es", "ja", "su"])
def test_sot_sequence_multilingual_matches_faster_whisper(base, language, task):
    expected = _faster_whisper(base, True, task=task, language=language).sot_sequence
    assert base.sot_sequence(language, task) == expected
    assert len(expected) == 3


def test_sot_sequence_multilingual_values(base):
    assert base.sot_sequence("en", "transcribe") == [50258, 50259, 50359]
    assert base.sot_sequence("de", "translate") == [50258, 50261, 50358]
    assert base.sot_sequence("german", "transcribe") == [50258, 50261, 50359]  # full names too
    assert base.sot_sequence("DE", "transcribe") == [50258, 50261, 50359]


def test_sot_sequence_multilingual_without_language_leaves_a_slot(base):
    assert base.sot_sequence(None, "transcribe") == [base.sot, -1, base.transcribe]
    assert base.sot_sequence(None, "translate") == [base.sot, -1, base.translate]


@pytest.mark.parametrize("language", ["xx", "klingon", "yue"])  # yue: only large-v3 has it
def test_unknown_language(base, language):
    with pytest.raises(ValueError, match=f"'{language}'"):
        base.sot_sequence(language, "transcribe")


def test_unknown_task(model):
    _, tok, _, _ = model
    with pytest.raises(ValueError, match="'transcribee'"):
        tok.sot_sequence("en", "transcribee")


# -- bad files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["this is not json", '{"a": 1}', "", "[1, 2, 3]"])
def test_not_a_tokenizer_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError) as info:
        WhisperTokenizer(path, multilingual=False)
    assert str(path) in str(info.value)


def test_missing_tokenizer_file(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(TokenizerError, match="missing.json"):
        WhisperTokenizer(path, multilingual=True)


def _word_level(tmp_path, vocab: dict[str, int]) -> str:
    from tokenizers.models import WordLevel

    path = tmp_path / "tokenizer.json"
    tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(path))
    return str(path)


WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
                    "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]


def test_tokenizer_without_whisper_specials(tmp_path):
    path = _word_level(tmp_path, {"<unk>": 0, "hello": 1, "world": 2})
    with pytest.raises(TokenizerError) as info:
        WhisperTokenizer(path, multilingual=False)
    assert path in str(info.value) and "<|endoftext|>" in str(info.value)


def test_special_ids_are_looked_up_not_hard_coded(tmp_path):
    vocab = {"<unk>": 0, "a": 1}
    vocab.update({name: 10 + i for i, name in enumerate(WHISPER_SPECIALS)})
    tok = WhisperTokenizer(_word_level(tmp_path, vocab), multilingual=False)
    assert (tok.eot, tok.sot, tok.translate, tok.transcribe, tok.sot_lm, tok.sot_prev, tok.no_speech,
            tok.no_timestamps, tok.timestamp_begin) == tuple(range(10, 19))


def test_multilingual_tokenizer_needs_language_tokens(tmp_path):
    vocab = {"<unk>": 0, "a": 1}
    vocab.update({name: 10 + i for i, name in enumerate(WHISPER_SPECIALS)})
    path = _word_level(tmp_path, vocab)
    with pytest.raises(TokenizerError, match="language"):
        WhisperTokenizer(path, multilingual=True)


def test_tokenizer_error_is_a_value_error():
    assert issubclass(TokenizerError, ValueError)
