"""The streaming policy's newer knobs (pure code: the real tokenizer, results built by hand)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_realtime.audio import SAMPLE_RATE
from jax_realtime.config import StreamConfig
from jax_realtime.streaming import Utterance


@dataclasses.dataclass
class Result:
    tokens: list[int]
    no_speech_prob: float = 0.0
    avg_logprob: float = -0.1
    compression_ratio: float = 1.0
    prompt_tokens: int = 4


def speech(seconds: float) -> np.ndarray:
    return np.full(round(seconds * SAMPLE_RATE), 0.1, np.float32)


def test_holdback_sends_all_but_the_newest_tokens(tiny_engine):
    tok = tiny_engine.tokenizer
    words = tok.encode(" one two three four five six")
    utterance = Utterance(StreamConfig(agreement=1, holdback_tokens=2), tok)

    utterance.add_audio(speech(1.0))
    window = utterance.next_window()
    assert window.prefix == []
    delta = utterance.apply(window, Result(words[:4]))
    assert delta == tok.decode(words[:2]).lstrip()  # the last two wait

    utterance.add_audio(speech(1.0))
    window = utterance.next_window()
    assert window.prefix == words[:2]  # decoding continues the committed text
    delta = utterance.apply(window, Result(words[:6]))
    assert delta == tok.decode(words[:4])[len(tok.decode(words[:2])):]

    utterance.finish()
    window = utterance.next_window()
    delta = utterance.apply(window, Result(words))  # the last window commits everything
    assert utterance.done
    assert utterance.text == tok.decode(words).lstrip()


def test_a_continuing_step_is_capped_and_the_last_one_is_not(tiny_engine):
    utterance = Utterance(StreamConfig(max_step_tokens=12), tiny_engine.tokenizer)
    utterance.add_audio(speech(2.0))
    assert utterance.next_window().max_new_tokens == 12
    utterance.finish()
    assert utterance.next_window().max_new_tokens is None


def test_partial_is_the_newest_hypothesis_beyond_the_committed_text(tiny_engine):
    """``partial``: what the newest hypothesis says after the committed text (the held-back tail,
    or all of it before any agreement); replaced by each step, "" once done or silent."""
    tok = tiny_engine.tokenizer
    words = tok.encode(" one two three four five six")
    utterance = Utterance(StreamConfig(agreement=2, holdback_tokens=2), tok)
    assert utterance.partial == ""

    utterance.add_audio(speech(1.0))
    assert utterance.apply(utterance.next_window(), Result(words[:3])) == ""  # nothing agreed yet
    assert utterance.partial == "one two three"

    utterance.add_audio(speech(1.0))
    delta = utterance.apply(utterance.next_window(), Result(words[:2] + tok.encode(" to")))
    assert delta == "one"  # agreed on two tokens, less the newest two held back
    assert utterance.partial == " two to"
    assert utterance.text + utterance.partial == "one two to"

    utterance.add_audio(speech(1.0))
    silent = Result(words[:5], no_speech_prob=0.9, avg_logprob=-2.0)  # counts as empty
    assert utterance.apply(utterance.next_window(), silent) == ""
    assert utterance.partial == ""

    utterance.finish()
    utterance.apply(utterance.next_window(), Result(words))  # the output repeats the forced prefix
    assert utterance.done and utterance.partial == ""
    assert utterance.text == "one two three four five six"
