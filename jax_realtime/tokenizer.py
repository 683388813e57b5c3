"""Whisper's tokenizer: text <-> ids, the special ids, languages and the default suppressions.

Built on the ``tokenizers`` library from the checkpoint's ``tokenizer.json``.  Every special id
is looked up in the tokenizer, never hard-coded: English-only and multilingual checkpoints differ
by one.  Timestamp tokens are not in the ``tokenizer.json`` files the CTranslate2 packages ship,
so, as openai-whisper does, they are ``<|notimestamps|> + 1 + i`` for ``i * 0.02`` seconds.
"""

from __future__ import annotations

import functools
import os

from .audio import TIME_PRECISION

# Whisper's languages, in the order of their tokens (openai-whisper's tokenizer.LANGUAGES).
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}

TASKS = ("transcribe", "translate")


# The longest prompt text a client may send (REST ``prompt``, a realtime session's prompt); longer
# is refused, not truncated.  Whisper conditions on at most 223 tokens of previous text (a long
# prompt's end); English averages about 4.5 characters a token, so 4096 characters is four times
# what can be used, and tokenising that many takes about 1-3 ms (harmless on the event loop; two
# megabytes took 1.7 s).
MAX_PROMPT_CHARS = 4096


class TokenizerError(ValueError):
    """A tokenizer file that does not describe a Whisper vocabulary."""


class WhisperTokenizer:
    """Text and special tokens of one Whisper checkpoint.

    ``multilingual`` comes from the model (its vocabulary size), because English-only
    checkpoints ship a ``tokenizer.json`` that still lists every language token.
    """

    def __init__(self, tokenizer_file: str | os.PathLike, multilingual: bool):
        from tokenizers import Tokenizer

        self.path = os.fspath(tokenizer_file)
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise TokenizerError(f"{self.path}: not a tokenizer.json ({exc})") from exc
        self.multilingual = multilingual

        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.translate = self._special("<|translate|>")
        self.transcribe = self._special("<|transcribe|>")
        self.sot_lm = self._special("<|startoflm|>")
        self.sot_prev = self._special("<|startofprev|>")
        self.no_speech = self._special("<|nospeech|>", "<|nocaptions|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1
        # Language tokens follow <|startoftranscript|> in the order of LANGUAGES.
        self.language_ids: dict[str, int] = {}
        if multilingual:
            for code in LANGUAGES:
                token_id = self._tok.token_to_id(f"<|{code}|>")
                if token_id is not None and self.sot < token_id < self.translate:
                    self.language_ids[code] = token_id
            if not self.language_ids:
                raise TokenizerError(f"{self.path}: a multilingual model needs language tokens")

    def _special(self, *names: str) -> int:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise TokenizerError(f"{self.path}: special token {names[0]} is missing")

    # -- text ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text to token ids, without any special token."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str | None) -> list[int]:
        """A previous-text prompt (``initial_prompt``, a session's ``prompt``) as Whisper encodes
        it: the stripped text after one space; none for no text or blank text."""
        text = (text or "").strip()
        return self.encode(" " + text) if text else []

    def decode(self, ids) -> str:
        """Text of the ids; special and timestamp tokens are left out."""
        return self._tok.decode([int(i) for i in ids if int(i) < self.eot])

    def is_timestamp(self, token_id: int) -> bool:
        return token_id >= self.timestamp_begin

    def timestamp_seconds(self, token_id: int) -> float:
        return (token_id - self.timestamp_begin) * TIME_PRECISION

    # -- prompts ------------------------------------------------------------------------------
    def language_id(self, language: str) -> int:
        """Token id of an ISO code; raises ``ValueError`` naming the code when the model lacks it."""
        code = language.lower()
        if not self.multilingual:
            if code != "en":
                raise ValueError(f"language '{language}' is not supported by an English-only model")
            return -1
        if code not in self.language_ids:
            # accept full names too ("german")
            by_name = {name: c for c, name in LANGUAGES.items()}
            if code in by_name and by_name[code] in self.language_ids:
                return self.language_ids[by_name[code]]
            raise ValueError(f"language '{language}' is not supported by this model")
        return self.language_ids[code]

    def sot_sequence(self, language: str | None, task: str) -> list[int]:
        """``<|startoftranscript|>`` [language] [task] for this model.

        English-only models take ``<|startoftranscript|>`` alone, as openai-whisper and
        faster-whisper build it.  For multilingual models a ``None`` language leaves the slot to
        be filled by detection: it is returned as ``-1``.
        """
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not '{task}'")
        if not self.multilingual:
            if task == "translate":
                raise ValueError("an English-only model cannot translate")
            if language is not None:
                self.language_id(language)  # validates
            return [self.sot]
        lang = -1 if language is None else self.language_id(language)
        return [self.sot, lang, self.translate if task == "translate" else self.transcribe]

    # -- suppression --------------------------------------------------------------------------
    @functools.cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens of symbols that are not speech (openai-whisper's list, built the same way)."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return tuple(sorted(result))

    @functools.cached_property
    def suppress_tokens(self) -> tuple[int, ...]:
        """Whisper's default ``suppress_tokens=[-1]``: non-speech symbols and the task tokens."""
        specials = {self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech}
        return tuple(sorted(set(self.non_speech_tokens) | specials))

    @functools.cached_property
    def suppress_blank(self) -> tuple[int, ...]:
        """Suppressed at the first sampled position: a bare space and end of text."""
        return tuple(self.encode(" ") + [self.eot])
