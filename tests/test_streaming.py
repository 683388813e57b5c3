"""The streaming policy (pure code: the real tokenizer, results built by hand)."""

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


def test_holdback_sends_all_but_the_newest_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
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


def test_a_continuing_step_is_capped_and_the_last_one_is_not(tiny_tokenizer):
    utterance = Utterance(StreamConfig(max_step_tokens=12), tiny_tokenizer)
    utterance.add_audio(speech(2.0))
    assert utterance.next_window().max_new_tokens == 12
    utterance.finish()
    assert utterance.next_window().max_new_tokens is None


def test_partial_is_the_newest_hypothesis_beyond_the_committed_text(tiny_tokenizer):
    """``partial``: what the newest hypothesis says after the committed text (the held-back tail,
    or all of it before any agreement); replaced by each step, "" once done or silent."""
    tok = tiny_tokenizer
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


# -- moving the window: nothing leaves it uncovered ----------------------------------------------------

STEP = StreamConfig(step_s=1.0, agreement=1, holdback_tokens=0, trim_after_s=4.0, max_window_s=10.0,
                    max_prompt_tokens=32)


def stamp(tok, seconds: float) -> int:
    return tok.timestamp_begin + round(seconds / 0.02)


def covered(utterance: Utterance) -> None:
    """The invariant: the stretches that left the window tile the utterance from its first sample."""
    stretches = utterance.stretches
    assert stretches[0].start_s == 0.0
    for before, after in zip(stretches, stretches[1:]):
        assert abs(before.end_s - after.start_s) < 1e-9, stretches


def test_a_rejected_decode_is_decoded_again_afresh_and_nothing_is_cut(tiny_tokenizer):
    tok = tiny_tokenizer
    utterance = Utterance(STEP, tok, tok.encode(" Earlier text."))
    utterance.add_audio(speech(5.0))  # longer than trim_after_s: a window that matters
    window = utterance.next_window()
    assert not window.fresh and window.prompt
    utterance.apply(window, Result(tok.encode(" the the the"), compression_ratio=3.0))  # repetitive
    assert utterance.stretches == [] and utterance.window_samples == 5 * SAMPLE_RATE
    retry = utterance.next_window()
    assert retry.fresh and retry.prompt == [] and retry.prefix == [] and retry.temperature == 0.0
    utterance.apply(retry, Result(tok.encode(" the the the"), compression_ratio=3.0))
    again = utterance.next_window()
    assert again.fresh and again.temperature > 0  # the last attempt samples
    words = tok.encode(" Hello there, and welcome")
    utterance.apply(again, Result([stamp(tok, 0.0)] + words[:3] + [stamp(tok, 2.0), stamp(tok, 2.0)] + words[3:]))
    assert utterance.stretches == []  # a fresh decode cuts only inside committed text


def test_silence_is_cut_only_when_heard_as_silence_with_and_without_the_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    utterance = Utterance(STEP, tok, tok.encode(" Earlier text."))
    utterance.add_audio(np.zeros(6 * SAMPLE_RATE, np.float32))
    silent = Result([], no_speech_prob=0.9, avg_logprob=-1.5)
    window = utterance.next_window()
    utterance.apply(window, silent)
    assert utterance.stretches == []  # not yet: the prompt may be why
    retry = utterance.next_window()
    assert retry.fresh and retry.prompt == []
    utterance.apply(retry, silent)
    (stretch,) = utterance.stretches
    assert (stretch.start_s, stretch.end_s, stretch.tokens, stretch.reason) == (0.0, 5.0, 0, "silence")
    assert utterance.window_samples == SAMPLE_RATE  # the last second stays: speech may be starting


def test_a_short_window_heard_as_silence_waits_for_more_audio(tiny_tokenizer):
    utterance = Utterance(STEP, tiny_tokenizer)
    utterance.add_audio(np.zeros(2 * SAMPLE_RATE, np.float32))
    utterance.apply(utterance.next_window(), Result([], no_speech_prob=0.9, avg_logprob=-1.5))
    assert utterance.stretches == [] and not utterance.next_window().fresh


def test_a_fresh_decode_cuts_where_its_segment_ends_inside_the_committed_text(tiny_tokenizer):
    tok = tiny_tokenizer
    utterance = Utterance(STEP, tok)
    first, second = tok.encode(" The quick brown fox jumps."), tok.encode(" Over the lazy dog")
    utterance.add_audio(speech(3.0))
    utterance.apply(utterance.next_window(), Result([stamp(tok, 0.0)] + first + second[:2]))
    assert utterance.text == tok.decode(first + second[:2]).lstrip()
    utterance.add_audio(speech(2.0))  # 5 s: longer than trim_after_s, no segment end committed
    fresh = utterance.next_window()
    assert fresh.fresh and fresh.prompt == [] and fresh.prefix == []
    # Whisper's fresh segmentation: the first sentence ends at 2.40 s (spelt a little differently)
    fresh_out = ([stamp(tok, 0.0)] + tok.encode(" The quick brown fox jumps!") + [stamp(tok, 2.4), stamp(tok, 2.4)]
                 + second + [stamp(tok, 4.9)])
    utterance.apply(fresh, Result(fresh_out))
    (stretch,) = utterance.stretches
    assert (stretch.start_s, stretch.end_s, stretch.reason) == (0.0, 2.4, "text")
    assert stretch.tokens == len(tok.encode(" The quick brown fox jumps."))  # the "." goes with its sentence
    following = utterance.next_window()
    assert following.start_s == 2.4
    assert following.prefix == [stamp(tok, 0.0)] + second[:2]  # the rest of the committed text, re-timed
    assert utterance.text == tok.decode(first + second[:2]).lstrip()  # nothing sent twice


def test_a_segment_said_to_end_after_the_audio_is_no_place_to_cut(tiny_tokenizer):
    tok = tiny_tokenizer
    utterance = Utterance(STEP, tok)
    words = tok.encode(" The hospital has followed protocol")
    utterance.add_audio(speech(3.0))
    utterance.apply(utterance.next_window(), Result([stamp(tok, 0.0)] + words))
    utterance.add_audio(speech(2.0))
    fresh = utterance.next_window()
    utterance.apply(fresh, Result([stamp(tok, 0.0)] + words + [stamp(tok, 8.0), stamp(tok, 8.0)]))
    assert utterance.stretches == []


def test_a_full_window_without_segment_ends_is_decoded_afresh_and_cut_where_the_text_ends(tiny_tokenizer):
    tok = tiny_tokenizer
    settings = StreamConfig(step_s=1.0, agreement=1, holdback_tokens=0, trim_after_s=8.0, max_window_s=10.0)
    utterance = Utterance(settings, tok)
    words = tok.encode(" one two three four five six seven eight nine ten eleven twelve")
    utterance.add_audio(speech(12.0))  # a session behind its audio: more than one full window
    window = utterance.next_window()
    assert not window.fresh and len(window.audio) == 10 * SAMPLE_RATE and window.max_new_tokens is None
    utterance.apply(window, Result([stamp(tok, 0.0)] + words))  # the whole window, one open segment
    assert utterance.stretches == []  # no segment end: no cut
    fresh = utterance.next_window()
    assert fresh.fresh and fresh.max_new_tokens is None
    out = [stamp(tok, 0.0)] + words[:8] + [stamp(tok, 6.0), stamp(tok, 6.0)] + words[8:] + [stamp(tok, 7.5)]
    utterance.apply(fresh, Result(out))
    (stretch,) = utterance.stretches
    assert stretch.end_s == 7.5  # where Whisper's text ends, not at the window's end (10 s)
    assert utterance.text == tok.decode(words).lstrip()


def test_a_full_window_that_yields_no_segment_end_and_no_committed_text_is_not_decoded_forever(tiny_tokenizer):
    """A full window whose continuation commits nothing and places no segment end (Whisper's " a"
    for 30 s of a quiet speaker under a previous-text prompt) must not be continued again: the
    same request would give the same answer forever (found streaming FLEURS unpaced).  The next
    decode is a fresh one, which always cuts a full window."""
    tok = tiny_tokenizer
    settings = StreamConfig(step_s=1.0, agreement=1, holdback_tokens=3, trim_after_s=8.0, max_window_s=10.0)
    utterance = Utterance(settings, tok)
    utterance.add_audio(speech(12.0))
    utterance.finish()
    window = utterance.next_window()
    assert not window.fresh and len(window.audio) == 10 * SAMPLE_RATE
    utterance.apply(window, Result([stamp(tok, 0.0)] + tok.encode(" a")))
    assert utterance.stretches == [] and utterance.text == ""
    fresh = utterance.next_window()
    assert fresh.fresh
    words = tok.encode(" one two three four")
    utterance.apply(fresh, Result([stamp(tok, 0.0)] + words + [stamp(tok, 9.0)]))
    assert utterance.stretches and utterance.stretches[-1].end_s <= 10.0


def test_text_closed_well_before_the_end_of_the_audio_is_committed_whole(tiny_tokenizer):
    tok = tiny_tokenizer
    utterance = Utterance(StreamConfig(agreement=1, holdback_tokens=3), tok)
    words = tok.encode(" That is all.")
    utterance.add_audio(speech(4.0))
    utterance.apply(utterance.next_window(), Result([stamp(tok, 0.0)] + words + [stamp(tok, 1.5)]))
    assert utterance.text == tok.decode(words).lstrip()  # no holding back: Whisper heard it end


def test_the_stretches_cover_the_whole_utterance(tiny_tokenizer):
    tok = tiny_tokenizer
    utterance = Utterance(STEP, tok)
    sentence = tok.encode(" The quick brown fox jumps.")

    def answer(window):
        """Whisper's plausible output: after the prefix, one more sentence that ends 1.2 s before
        the end of the window's audio (or at its end)."""
        seconds = len(window.audio) / SAMPLE_RATE
        stamps = [t for t in window.prefix if t >= tok.timestamp_begin]
        opening = [stamps[-1]] if window.prefix and window.prefix[-1] >= tok.timestamp_begin else []
        if not window.prefix:
            opening = [stamp(tok, 0.0)]
        return Result(window.prefix + opening + sentence + [stamp(tok, max(0.2, seconds - 1.2))])

    for _ in range(4):
        utterance.add_audio(speech(3.0))
        utterance.apply(window := utterance.next_window(), answer(window))
    utterance.finish()
    while not utterance.done:
        utterance.apply(window := utterance.next_window(), answer(window))
    covered(utterance)
    assert utterance.stretches[-1].end_s == 12.0
    assert sum(s.tokens for s in utterance.stretches) == len(utterance.tokens)
    assert [s.reason for s in utterance.stretches][-1] == "end"


def test_the_audio_buffer_behaves_like_an_array():
    from jax_realtime.streaming import AudioBuffer

    rng = np.random.default_rng(0)
    buffer, reference = AudioBuffer(), np.zeros(0, np.float32)
    for _ in range(300):
        op = rng.integers(4)
        if op <= 1:
            chunk = rng.standard_normal(int(rng.integers(0, 5000))).astype(np.float32)
            buffer.append(chunk)
            reference = np.concatenate([reference, chunk])
        elif op == 2:
            n = int(rng.integers(0, 8000))
            buffer.drop_front(n)
            reference = reference[n:]
        else:
            n = int(rng.integers(0, 3000))
            buffer.drop_back(n)
            reference = reference[: max(0, len(reference) - n)]
        assert len(buffer) == len(reference)
        n = int(rng.integers(0, 20000))
        np.testing.assert_array_equal(buffer.head(n), reference[:n])


def test_text_running_past_the_audio_or_too_dense_is_decoded_again(tiny_tokenizer):
    tok = tiny_tokenizer
    settings = StreamConfig(step_s=1.0, agreement=1, holdback_tokens=0, trim_after_s=4.0, max_window_s=10.0)
    loop = tok.encode(" Paris, Louis, Paris, Louis, Paris, Paris, Paris")
    # a timestamp 3 s after the end of a 4.5 s window: made-up text
    utterance = Utterance(settings, tok)
    utterance.add_audio(speech(4.5))
    utterance.apply(utterance.next_window(), Result([stamp(tok, 0.0)] + loop + [stamp(tok, 7.5)]))
    assert utterance.text == "" and utterance.next_window().fresh
    # a segment opened 0.5 s before the end of the window holding 20 tokens: a loop
    utterance = Utterance(settings, tok)
    utterance.add_audio(speech(4.5))
    words = tok.encode(" in the early Middle Ages.")
    out = [stamp(tok, 0.0)] + words + [stamp(tok, 4.0), stamp(tok, 4.0)] + loop * 3
    utterance.apply(utterance.next_window(), Result(out))
    assert utterance.text == "" and utterance.next_window().fresh


def test_a_segment_spanning_more_speech_than_its_text_says_is_decoded_again(tiny_tokenizer):
    """The last window of an utterance, continuing its committed text, jumps over two sentences:
    "... of about<7.08><7.08> 1455.<13.08>" (3 text tokens for 6 s the VAD hears as speech, where
    a segment says at most 0.75 s per token and 1 s more).  It is not committed: the window is
    decoded again afresh, and the fresh text (which hears the sentences) is what is committed.
    Without the VAD's speech there, the same output is plausible (a pause) and committed."""
    tok = tiny_tokenizer
    settings = StreamConfig(step_s=1.0, agreement=1, holdback_tokens=0, trim_after_s=20.0)
    before = tok.encode(" The earliest book printed with movable types, the Bible of about")
    year, lost = tok.encode(" 1455."), tok.encode(" For those should never read it.")
    after = tok.encode(" Printing then.")
    for heard in (True, False):
        utterance = Utterance(settings, tok)
        utterance.add_audio(speech(15.0))
        utterance.mark_speech(0, 512, np.array([heard or k * 512 < 7 * SAMPLE_RATE for k in range(15 * SAMPLE_RATE // 512)]))
        window = utterance.next_window()
        utterance.apply(window, Result([stamp(tok, 0.0)] + before + [stamp(tok, 7.0)]))
        utterance.finish()
        window = utterance.next_window()
        skipped = window.prefix + [stamp(tok, 7.0)] + year + [stamp(tok, 13.0), stamp(tok, 13.0)] + after
        utterance.apply(window, Result(skipped + [stamp(tok, 14.5)]))
        if not heard:  # silence between: nothing was skipped
            assert utterance.done and utterance.text == tok.decode(before + year + after).lstrip()
            continue
        assert not utterance.done and utterance.text == tok.decode(before).lstrip()
        fresh = utterance.next_window()
        assert fresh.fresh and fresh.prefix == [] and fresh.start_s == 0.0
        heard_all = before + year + lost + after
        utterance.apply(fresh, Result([stamp(tok, 0.0)] + heard_all + [stamp(tok, 14.5)]))
        assert utterance.done and utterance.text == tok.decode(heard_all).lstrip()
        covered(utterance)


def test_a_last_window_whisper_stops_early_in_is_decoded_on(tiny_tokenizer):
    tok = tiny_tokenizer
    utterance = Utterance(StreamConfig(step_s=1.0, agreement=1, holdback_tokens=0, trim_after_s=15.0), tok)
    first, second = tok.encode(" Down to the earth he rolled."), tok.encode(" And good it is.")
    utterance.add_audio(speech(19.0))
    utterance.finish()
    window = utterance.next_window()
    utterance.apply(window, Result([stamp(tok, 0.0)] + first + [stamp(tok, 12.08), stamp(tok, 12.08)]))
    assert not utterance.done  # 7 s were never listened to
    rest = utterance.next_window()
    assert rest.start_s == 12.08 and len(rest.audio) == round((19.0 - 12.08) * SAMPLE_RATE)
    utterance.apply(rest, Result(rest.prefix + second + [stamp(tok, 6.5)]))
    assert utterance.done and utterance.text == tok.decode(first + second).lstrip()
    covered(utterance)


def test_audio_the_vad_hears_no_speech_in_is_not_decoded_and_leaves_the_window(tiny_tokenizer):
    tok = tiny_tokenizer
    settings = StreamConfig(step_s=1.0, agreement=1, holdback_tokens=0, trim_after_s=4.0, max_window_s=10.0)
    utterance = Utterance(settings, tok)
    words = tok.encode(" That is all.")

    framed = [0]  # as a VAD frames a stream: 512-sample frames, back to back

    def hear(speech_until: int) -> None:
        start, samples = utterance.vad_input()
        n = (start + len(samples) - framed[0]) // 512
        voiced = [framed[0] + 512 * (k + 1) <= speech_until for k in range(n)]
        utterance.mark_speech(framed[0], 512, np.array(voiced, bool))
        framed[0] += 512 * n

    utterance.add_audio(speech(2.0))
    hear(round(1.2 * SAMPLE_RATE))  # speech ends a little after Whisper says its text does (within tolerance)
    assert utterance.wants_decode()
    utterance.apply(utterance.next_window(), Result([stamp(tok, 0.0)] + words + [stamp(tok, 1.0)]))
    assert utterance.text == tok.decode(words).lstrip()  # closed 1 s before the end: committed whole
    for second in range(6):  # silence: no decode, and the window does not grow
        utterance.add_audio(np.zeros(SAMPLE_RATE, np.float32))
        hear(SAMPLE_RATE)
        assert not utterance.wants_decode(), second
    assert utterance.window_samples <= 1.1 * SAMPLE_RATE  # the silence left, but its last second
    reasons = [s.reason for s in utterance.stretches]
    assert reasons[0] == "text" and set(reasons[1:]) == {"silence"}, reasons
    covered(utterance)
    utterance.add_audio(speech(1.0))  # speech again: decoded
    hear(20 * SAMPLE_RATE)
    assert utterance.wants_decode()


def test_speech_the_vad_hears_after_the_text_keeps_the_window(tiny_tokenizer):
    """Whisper closes its text at 1 s, the VAD hears speech on to 3 s: that is speech Whisper did not
    transcribe, so the window is not cut there and the audio keeps being decoded."""
    tok = tiny_tokenizer
    settings = StreamConfig(step_s=1.0, agreement=1, holdback_tokens=0, trim_after_s=4.0, max_window_s=10.0)
    utterance = Utterance(settings, tok)
    words = tok.encode(" That is all.")
    utterance.add_audio(speech(3.0))
    start, samples = utterance.vad_input()
    utterance.mark_speech(start, 512, np.ones(len(samples) // 512, bool))
    for _ in range(4):
        window = utterance.next_window()
        utterance.apply(window, Result(window.prefix or [stamp(tok, 0.0)] + words + [stamp(tok, 1.0)]))
        utterance.add_audio(np.zeros(SAMPLE_RATE, np.float32))
        start, samples = utterance.vad_input()
        utterance.mark_speech(start, 512, np.zeros(len(samples) // 512, bool))
        assert utterance.wants_decode()
    assert utterance.stretches == []


def test_committed_words_are_handed_out_once_across_the_context(tiny_tokenizer):
    """The word timestamps extension's bookkeeping (alignments built by hand, as Engine.align
    returns them): open text hands out every word but the last; the next alignment starts with
    the last word handed out as context and does not hand it out again, also when punctuation
    merging moved a token over the context's end; the end of the utterance hands out the rest."""
    from jax_realtime.alignment import WindowWords, WordTiming

    tok = tiny_tokenizer
    rome, paris, comma, lyon = (tok.encode(w) for w in (" Rome", " Paris", ",", " Lyon."))
    utterance = Utterance(StreamConfig(agreement=1, holdback_tokens=0, trim_after_s=20.0), tok, word_timestamps=True)
    utterance.add_audio(speech(3.0))
    window = utterance.next_window()
    utterance.apply(window, Result([stamp(tok, 0.0)] + rome + paris))
    (job,) = utterance.words.jobs()
    assert job.tokens == rome + paris and job.context == 0 and not job.final
    timing = [WordTiming(" Rome", 0.5, 0.9, 0.9, rome), WordTiming(" Paris", 1.0, 1.6, 0.9, paris)]
    words = utterance.words.take([job], [WindowWords(timing, 0.5, 1.0)])
    assert [w.word for w in words] == [" Rome"]  # Paris waits: a comma may still join it

    utterance.add_audio(speech(1.0))
    utterance.finish()
    window = utterance.next_window()
    utterance.apply(window, Result(window.prefix + comma + lyon + [stamp(tok, 3.8)]))
    assert utterance.done
    (job,) = utterance.words.jobs()
    assert job.tokens == rome + paris + comma + lyon and job.context == len(rome) and job.final
    assert job.start == round(0.5 * SAMPLE_RATE)  # the context's audio, from its start
    # the aligner merged the comma into Paris; Rome (the context) is not handed out again
    timing = [WordTiming(" Rome", 0.0, 0.4, 0.9, rome), WordTiming(" Paris,", 0.5, 1.1, 0.9, paris + comma),
              WordTiming("", 1.1, 1.1, 0.0, []), WordTiming(" Lyon.", 1.4, 2.0, 0.9, lyon)]
    words = utterance.words.take([job], [WindowWords(timing, 0.5, 1.0)])
    assert [(w.word, w.start) for w in words] == [(" Paris,", 1.0), (" Lyon.", 1.9)]
    assert utterance.words.jobs() == []

    # a word merged into the context's last token (a job whose first new token is punctuation):
    # the comma counts as handed out with the context's word, Lyon is handed out once
    utterance = Utterance(StreamConfig(agreement=1, holdback_tokens=0), tok, word_timestamps=True)
    utterance.add_audio(speech(3.0))
    utterance.finish()
    window = utterance.next_window()
    utterance.apply(window, Result([stamp(tok, 0.0)] + paris + comma + lyon + [stamp(tok, 2.5)]))
    words = utterance.words
    words._sent, words._context, words._context_start = len(paris), 0, 0  # Paris handed out before
    (job,) = words.jobs()
    assert job.context == len(paris) and job.tokens == paris + comma + lyon
    timing = [WordTiming(" Paris,", 0.0, 0.6, 0.9, paris + comma), WordTiming(" Lyon.", 0.8, 1.4, 0.9, lyon)]
    assert [w.word for w in words.take([job], [WindowWords(timing, 0.5, 1.0)])] == [" Lyon."]
    assert words.jobs() == []
