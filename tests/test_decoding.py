"""Whisper's decoding rules on small synthetic logits, the greedy step, and the host-side helpers.

The fake vocabulary (40 ids) keeps every rule visible by eye:

    0..19 text | 20 eot | 21 sot | 22 no_speech | 23..28 other specials | 29 notimestamps | 30..39 timestamps

Expected values come from the rules as openai-whisper and CTranslate2 (``ApplyTimestampRules`` in
``src/models/whisper.cc``) state them; ``_reference_filters`` below restates them as a per-row loop.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_realtime.decoding import (
    COMPRESSION_RATIO_THRESHOLD,
    MAX_INITIAL_TIMESTAMP,
    DecodeState,
    History,
    DecodingIds,
    Segment,
    apply_filters,
    compression_ratio,
    greedy_step,
    split_segments,
)

EOT, SOT, NO_SPEECH, NO_TS, TB = 20, 21, 22, 29, 30
IDS = DecodingIds(
    n_vocab=40,
    eot=EOT,
    sot=SOT,
    no_speech=NO_SPEECH,
    no_timestamps=NO_TS,
    timestamp_begin=TB,
    suppress=(3, SOT, NO_SPEECH),
    suppress_blank=(7, EOT),
    language_ids=(),
    max_initial_timestamp_index=3,  # first timestamp at most 30 + 3
)
MAX_STEPS = 12
NEG = -np.inf
TEXT = [i for i in range(EOT) if i not in IDS.suppress and i not in IDS.suppress_blank]  # plain text ids


def _filters(logits, step, histories, timestamps, ids=IDS):
    """Run apply_filters on rows with the given sampled histories (each of length ``step``)."""
    logits = np.asarray(logits, np.float32)
    if logits.ndim == 1:
        logits = logits[None]
    rows = []
    for history in histories:
        assert len(history) == step
        rows.append(History.of_prefix(list(history), ids.timestamp_begin))
    state = History(*(jnp.asarray(np.asarray(col, np.int32)) for col in zip(*rows)))
    out = _apply_filters_jit(jnp.asarray(logits), state, jnp.asarray(np.asarray(timestamps, bool)), ids)
    return np.asarray(out)


# compiled with a traced step, as the engine runs the rules inside its while_loop
_apply_filters_jit = jax.jit(apply_filters, static_argnames="ids")
_greedy_step_jit = jax.jit(greedy_step, static_argnames="ids")


def _logsumexp(x):
    m = np.max(x)
    return m + math.log(np.sum(np.exp(x - m))) if np.isfinite(m) else m


def _reference_filters(row_logits, history, timestamps, ids=IDS):
    """The rules, one row at a time, as CTranslate2's ApplyTimestampRules writes them."""
    x = np.asarray(row_logits, np.float64).copy()
    tb = ids.timestamp_begin
    x[list(ids.suppress)] = NEG
    if not history:
        x[list(ids.suppress_blank)] = NEG
    if not timestamps:
        return x
    x[ids.no_timestamps] = NEG
    check = False
    if not history:
        x[:tb] = NEG
        x[tb + ids.max_initial_timestamp_index + 1:] = NEG
    else:
        last = history[-1]
        if last >= tb:
            penultimate = history[-2] if len(history) >= 2 else last
            if penultimate >= tb:
                x[tb:] = NEG  # a pair is closed: text must follow
            else:
                x[: ids.eot] = NEG  # a pair is open: timestamp or end of text
                check = True
        else:
            check = True
        stamps = [t for t in history if t >= tb]
        if stamps:
            # never decrease; after text, increase (only a segment's closing timestamp may equal its opening)
            after_single = last >= tb and not (history[-2] >= tb if len(history) >= 2 else True)
            x[tb: stamps[-1] + (0 if after_single else 1)] = NEG
    if check:
        logprobs = x - _logsumexp(x)
        if _logsumexp(logprobs[tb:]) > np.max(logprobs[:tb]):
            x[:tb] = NEG
    return x


def _only_suppressed(out_row, in_row, suppressed):
    expected = np.asarray(in_row, np.float32).copy()
    expected[list(suppressed)] = NEG
    np.testing.assert_array_equal(out_row, expected)


def _rng_logits(seed, batch=1):
    return np.random.default_rng(seed).normal(0, 2, (batch, IDS.n_vocab)).astype(np.float32)


# -- suppression ---------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [0, 1, 5])
def test_suppress_tokens_every_step(step):
    logits = _rng_logits(step)
    logits[0, 3] = logits[0, SOT] = logits[0, NO_SPEECH] = 50.0  # would win otherwise
    history = [1, 2, 4, 5, 6][:step]
    out = _filters(logits, step, [history], [False])
    assert np.all(out[0, list(IDS.suppress)] == NEG)
    blank = IDS.suppress_blank if step == 0 else ()
    _only_suppressed(out[0], logits[0], set(IDS.suppress) | set(blank))


def test_suppress_blank_only_at_first_step():
    logits = _rng_logits(1)
    out0 = _filters(logits, 0, [[]], [False])
    assert out0[0, 7] == NEG and out0[0, EOT] == NEG
    for step in (1, 2, 7):
        out = _filters(logits, step, [[1] * step], [False])
        assert out[0, 7] == logits[0, 7] and out[0, EOT] == logits[0, EOT], step


def test_default_max_initial_timestamp_is_one_second():
    ids = DecodingIds(40, EOT, SOT, NO_SPEECH, NO_TS, TB, (), (), ())
    assert MAX_INITIAL_TIMESTAMP == 1.0
    assert ids.max_initial_timestamp_index == 50  # 1.0 s / 0.02 s


def test_mask():
    m = IDS.mask([0, 5, 39])
    assert m.shape == (40,) and m.dtype == bool and m.sum() == 3 and m[[0, 5, 39]].all()


# -- timestamp rules -----------------------------------------------------------------------------

def test_first_token_is_an_early_timestamp():
    logits = _rng_logits(2)
    logits[0, EOT] = logits[0, 5] = logits[0, NO_TS] = logits[0, 39] = 40.0
    out = _filters(logits, 0, [[]], [True])[0]
    allowed = list(range(TB, TB + IDS.max_initial_timestamp_index + 1))  # 30..33
    assert np.all(out[:TB] == NEG)  # text, eot, specials, <|notimestamps|>
    np.testing.assert_array_equal(out[allowed], logits[0, allowed])
    assert np.all(out[TB + IDS.max_initial_timestamp_index + 1:] == NEG)
    assert int(np.argmax(out)) in allowed


def test_after_initial_timestamp_text_must_follow():
    """At step 1 the initial timestamp counts as a closed pair (openai-whisper, CTranslate2)."""
    logits = _rng_logits(3)
    logits[0, 35] = 40.0
    out = _filters(logits, 1, [[TB]], [True])[0]
    assert np.all(out[TB:] == NEG)
    np.testing.assert_array_equal(out[TEXT], logits[0, TEXT])
    assert out[EOT] == logits[0, EOT]


def test_after_a_closed_pair_text_must_follow():
    logits = _rng_logits(4)
    logits[0, TB:] = 30.0  # timestamps very likely: must not be forced after a pair
    out = _filters(logits, 5, [[TB, 5, 6, 32, 32]], [True])[0]
    assert np.all(out[TB:] == NEG)
    np.testing.assert_array_equal(out[TEXT], logits[0, TEXT])
    assert out[EOT] == logits[0, EOT]
    assert out[NO_TS] == NEG


def test_after_a_single_timestamp_no_ordinary_text():
    logits = _rng_logits(5)
    logits[0, EOT] = 10.0  # end of text stays possible
    logits[0, 5] = 20.0
    out = _filters(logits, 4, [[TB, 5, 6, 32]], [True])[0]
    assert np.all(out[:EOT] == NEG)
    assert out[EOT] == 10.0
    assert np.all(out[TB:32] == NEG)  # never before the open timestamp
    np.testing.assert_array_equal(out[32:], logits[0, 32:])  # closing at the same time is allowed
    assert int(np.argmax(out)) == EOT


def test_timestamps_never_decrease():
    logits = _rng_logits(6)
    logits[0, :EOT] += 10.0  # keep text likelier so no timestamp is forced
    history = [TB, 5, 34, 34, 6]
    out = _filters(logits, 5, [history], [True])[0]
    # after text a timestamp must be later than the last one (no zero-length segment), as in
    # openai-whisper and CTranslate2 since PR #1174
    assert np.all(out[TB:35] == NEG)
    np.testing.assert_array_equal(out[35:], logits[0, 35:])
    np.testing.assert_array_equal(out[TEXT], logits[0, TEXT])
    # directly after a single timestamp the closing one may equal it
    out = _filters(logits, 3, [[TB, 5, 34]], [True])[0]
    assert np.all(out[TB:34] == NEG)
    np.testing.assert_array_equal(out[34:], logits[0, 34:])


def test_forced_timestamp_when_their_sum_beats_every_text_token():
    history = [TB, 5]
    logits = np.full((1, 40), -5.0, np.float32)
    logits[0, 6] = 2.0  # best text token: e^2 = 7.4
    logits[0, TB:] = 1.0  # nine allowed timestamps (after text, not <|0.00|> again): 9 e^1 = 24.5, each below e^2
    logits[0, 3] = 100.0  # suppressed: must not count as a text token
    out = _filters(logits, 2, [history], [True])[0]
    assert np.all(out[:TB + 1] == NEG)
    np.testing.assert_array_equal(out[TB + 1:], logits[0, TB + 1:])

    logits[0, TB:] = 0.0  # nine timestamps: 9 together, below the best text token's e^2.4 = 11
    logits[0, 6] = 2.4
    out = _filters(logits, 2, [history], [True])[0]
    assert out[6] == pytest.approx(2.4) and np.isfinite(out[EOT])
    np.testing.assert_array_equal(out[TB + 1:], logits[0, TB + 1:])


def test_forced_timestamp_is_not_applied_after_a_pair_or_without_timestamp_mode():
    logits = np.full((2, 40), -5.0, np.float32)
    logits[:, 6] = 2.0
    logits[:, TB:] = 1.0
    after_pair = _filters(logits[:1], 4, [[TB, 5, 31, 31]], [True])[0]
    assert after_pair[6] == 2.0 and np.all(after_pair[TB:] == NEG)
    plain = _filters(logits[1:], 2, [[5, 6]], [False])[0]
    _only_suppressed(plain, logits[1], IDS.suppress)


@pytest.mark.parametrize("step,history", [(0, []), (1, [TB]), (3, [TB, 5, 33]), (4, [TB, 5, 33, 33]), (2, [4, 5])])
def test_rows_without_timestamp_mode_are_untouched_by_timestamp_rules(step, history):
    logits = _rng_logits(10 + step)
    out = _filters(logits, step, [history], [False])[0]
    suppressed = set(IDS.suppress) | (set(IDS.suppress_blank) if step == 0 else set())
    _only_suppressed(out, logits[0], suppressed)
    assert out[NO_TS] == logits[0, NO_TS]  # <|notimestamps|> is only disabled in timestamp mode


def test_mixed_batch_rows_follow_their_own_rules():
    step = 4
    histories = [[TB, 5, 6, 32], [TB, 5, 32, 32], [1, 2, 4, 5], [TB, 5, 6, 8]]
    modes = [True, True, False, True]
    logits = _rng_logits(20, batch=4)
    batch_out = _filters(logits, step, histories, modes)
    for row in range(4):
        single = _filters(logits[row], step, [histories[row]], [modes[row]])[0]
        np.testing.assert_array_equal(batch_out[row], single)
        np.testing.assert_array_equal(batch_out[row], _reference_filters(logits[row], histories[row], modes[row]))
    assert np.all(batch_out[0, :EOT] == NEG)  # open pair
    assert np.all(batch_out[1, TB:] == NEG)  # closed pair
    _only_suppressed(batch_out[2], logits[2], IDS.suppress)  # no timestamp mode


def _random_history(rng, length, timestamps):
    """A history the rules allow: sampled from the reference filters, never ending early."""
    history = []
    for _ in range(length):
        allowed = np.flatnonzero(np.isfinite(_reference_filters(rng.normal(0, 2, 40), history, timestamps)))
        allowed = [a for a in allowed if a != IDS.eot]
        history.append(int(rng.choice(allowed)))
    return history


def test_random_batches_match_the_reference_rules():
    rng = np.random.default_rng(1234)
    checked_forced = 0
    for trial in range(60):
        step = int(rng.integers(0, 8))
        modes = [bool(m) for m in rng.integers(0, 2, 4)]
        modes[0] = True
        histories = [_random_history(rng, step, m) for m in modes]
        logits = rng.normal(0, 3, (4, 40)).astype(np.float32)
        logits[:, TB:] += rng.normal(0, 2)  # vary how likely timestamps are overall
        out = _filters(logits, step, histories, modes)
        for row in range(4):
            expected = _reference_filters(logits[row], histories[row], modes[row])
            np.testing.assert_array_equal(np.isfinite(out[row]), np.isfinite(expected), err_msg=f"{trial=} {row=}")
            finite = np.isfinite(expected)
            np.testing.assert_allclose(out[row][finite], expected[finite], rtol=0, atol=0)
            checked_forced += int(modes[row] and step > 0 and not np.isfinite(expected[:TB]).any())
    assert checked_forced > 0  # the forced-timestamp branch was exercised


# -- greedy step ---------------------------------------------------------------------------------

def _state(logits, done, step=0, tokens=None, sum_logprob=None, last_ts=None):
    batch = len(done)
    return DecodeState(
        step=jnp.int32(step),
        tokens=jnp.asarray(tokens if tokens is not None else np.full((batch, MAX_STEPS), EOT, np.int32)),
        logits=jnp.asarray(np.asarray(logits, np.float32)),
        done=jnp.asarray(np.asarray(done, bool)),
        sum_logprob=jnp.asarray(sum_logprob if sum_logprob is not None else np.zeros(batch, np.float32)),
        history=History(
            count=jnp.full((batch,), step, jnp.int32),
            last=jnp.full((batch,), -1, jnp.int32),
            penultimate=jnp.full((batch,), -1, jnp.int32),
            last_timestamp=jnp.asarray(last_ts if last_ts is not None else np.full(batch, -1, np.int32)),
        ),
        cache=(),
    )


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - _logsumexp(x)


def test_greedy_step_picks_filtered_argmax_and_finished_rows_emit_eot():
    logits = np.zeros((3, 40), np.float32)
    logits[:, 3] = 50.0  # suppressed everywhere
    logits[0, 9] = 5.0
    logits[1, 9] = 5.0
    logits[2, 12] = 4.0
    max_new = jnp.asarray([10, 10, 10], jnp.int32)
    token, s = _greedy_step_jit(_state(logits, [False, True, False]), jnp.zeros(3, bool), max_new, ids=IDS)
    assert token.tolist() == [9, EOT, 12]
    assert np.asarray(s.tokens)[:, 0].tolist() == [9, EOT, 12]
    assert int(s.step) == 1
    assert np.asarray(s.done).tolist() == [False, True, False]
    filtered = _filters(logits, 0, [[], [], []], [False] * 3)
    expected = [_log_softmax(filtered[0])[9], 0.0, _log_softmax(filtered[2])[12]]
    np.testing.assert_allclose(np.asarray(s.sum_logprob), expected, rtol=1e-5, atol=1e-6)


def test_greedy_step_accumulates_logprobs_and_stops_at_eot_and_max_new():
    rng = np.random.default_rng(7)
    max_new = jnp.asarray([6, 2, 6], jnp.int32)
    step_fn = functools.partial(_greedy_step_jit, ids=IDS)
    state = _state(np.zeros((3, 40)), [False, False, False])
    expected_sum = np.zeros(3)
    finished_at = [None, None, None]
    for step in range(6):
        logits = rng.normal(0, 1, (3, 40)).astype(np.float32)
        logits[:, 3] = 99.0  # suppressed
        if step == 3:
            logits[0, EOT] = 50.0  # row 0 ends here
        history = np.asarray(state.tokens)[:, :step].tolist()
        filtered = _filters(logits, step, history, [False] * 3)
        token, state = step_fn(state._replace(logits=jnp.asarray(logits)), jnp.zeros(3, bool), max_new)
        token = np.asarray(token)
        for row in range(3):
            if finished_at[row] is None:
                assert token[row] == int(np.argmax(filtered[row]))
                expected_sum[row] += _log_softmax(filtered[row])[token[row]]
                if token[row] == EOT or step + 1 >= int(max_new[row]):
                    finished_at[row] = step
            else:
                assert token[row] == EOT
        np.testing.assert_allclose(np.asarray(state.sum_logprob), expected_sum, rtol=1e-5)
        assert np.asarray(state.done).tolist() == [f is not None for f in finished_at]
    assert finished_at == [3, 1, 5]
    tokens = np.asarray(state.tokens)
    assert tokens[0, 3] == EOT and np.all(tokens[0, 4:6] == EOT)
    assert np.all(tokens[1, 2:6] == EOT) and tokens[1, 1] != EOT  # two tokens, then only end of text
    assert np.all(tokens[2, :6] != EOT)
    assert int(state.step) == 6


def test_greedy_step_tracks_the_last_timestamp():
    logits = np.zeros((2, 40), np.float32)
    logits[:, 32] = 9.0
    state = _state(logits, [False, True])
    token, s = _greedy_step_jit(state, jnp.asarray([True, True]), jnp.asarray([5, 5]), ids=IDS)
    assert token.tolist() == [32, EOT]
    assert np.asarray(s.history.last_timestamp).tolist() == [32, -1]
    # step 1 after the initial timestamp: text must follow, and the last timestamp is kept
    logits2 = np.zeros((2, 40), np.float32)
    logits2[:, 33] = 9.0
    logits2[:, 8] = 1.0
    token, s = _greedy_step_jit(s._replace(logits=jnp.asarray(logits2)), jnp.asarray([True, True]),
                                jnp.asarray([5, 5]), ids=IDS)
    assert token.tolist() == [8, EOT]
    assert np.asarray(s.history.last_timestamp).tolist() == [32, -1]


# -- segments ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from jax_realtime.tokenizer import WhisperTokenizer
    from jax_realtime.weights import resolve

    return WhisperTokenizer(resolve("tiny.en").tokenizer_file, multilingual=False)


def _ts(tok, seconds):
    return tok.timestamp_begin + round(seconds / 0.02)


def _check(seg: Segment, start, end, tokens, tok, complete=True):
    assert seg.start == pytest.approx(start) and seg.end == pytest.approx(end)
    assert seg.tokens == tokens
    assert seg.text == tok.decode(tokens)
    assert seg.complete is complete


def test_split_single_timestamp_ending(tok):
    a, b = tok.encode(" Hello there."), tok.encode(" How are you?")
    tokens = [_ts(tok, 0), *a, _ts(tok, 1.5), _ts(tok, 1.5), *b, _ts(tok, 3.0)]
    segments, seek = split_segments(tokens, tok, 5.0)
    assert len(segments) == 2
    _check(segments[0], 0.0, 1.5, a, tok)
    _check(segments[1], 1.5, 3.0, b, tok)
    assert seek == pytest.approx(5.0)  # everything decoded: the next window starts after this one


def test_split_unfinished_tail(tok):
    a, b, c = tok.encode(" One."), tok.encode(" Two."), tok.encode(" Three and")
    tokens = [_ts(tok, 0.4), *a, _ts(tok, 1.0), _ts(tok, 1.2), *b, _ts(tok, 2.0), _ts(tok, 2.2), *c]
    segments, seek = split_segments(tokens, tok, 4.0)
    assert len(segments) == 3
    _check(segments[0], 0.4, 1.0, a, tok)
    _check(segments[1], 1.2, 2.0, b, tok)
    # faster-whisper seeks to the last closed timestamp and decodes the rest again from there
    assert seek == pytest.approx(2.0)
    _check(segments[2], 2.0, 4.0, c, tok, complete=False)


def test_split_ending_with_a_pair_has_no_tail(tok):
    a = tok.encode(" Done.")
    segments, seek = split_segments([_ts(tok, 0), *a, _ts(tok, 1.0), _ts(tok, 1.0)], tok, 3.0)
    assert len(segments) == 1
    _check(segments[0], 0.0, 1.0, a, tok)
    assert seek == pytest.approx(1.0)


def test_split_without_timestamps(tok):
    a = tok.encode(" No timestamps at all here.")
    segments, seek = split_segments(a, tok, 4.2)
    assert len(segments) == 1
    _check(segments[0], 0.0, 4.2, a, tok)
    assert seek == pytest.approx(4.2)
    assert split_segments([], tok, 4.2) == ([], pytest.approx(4.2))


def test_split_without_a_pair(tok):
    a = tok.encode(" Only one segment.")
    segments, seek = split_segments([_ts(tok, 0), *a, _ts(tok, 2.0)], tok, 4.0)
    _check(segments[0], 0.0, 2.0, a, tok)
    assert seek == pytest.approx(4.0)
    # an opening <|0.00|> only: the segment runs to the end of the audio
    segments, seek = split_segments([_ts(tok, 0), *a], tok, 4.0)
    _check(segments[0], 0.0, 4.0, a, tok)
    assert seek == pytest.approx(4.0)


def test_split_clamps_times_to_the_duration(tok):
    a, b = tok.encode(" Early."), tok.encode(" Late")
    segments, seek = split_segments([_ts(tok, 0), *a, _ts(tok, 6.0)], tok, 4.0)
    _check(segments[0], 0.0, 4.0, a, tok)
    assert seek == pytest.approx(4.0)

    tokens = [_ts(tok, 1.0), *a, _ts(tok, 5.0), _ts(tok, 5.0), *b]
    segments, seek = split_segments(tokens, tok, 4.0)
    assert seek == pytest.approx(4.0)
    _check(segments[0], 1.0, 4.0, a, tok)
    _check(segments[1], 4.0, 4.0, b, tok, complete=False)
    for s in segments:
        assert 0.0 <= s.start <= s.end <= 4.0


# -- compression ratio ---------------------------------------------------------------------------

def test_compression_ratio():
    assert compression_ratio("") == 0.0
    text = "Printing, in the only sense with which we are at present concerned, differs from most arts."
    raw = text.encode("utf-8")
    assert compression_ratio(text) == pytest.approx(len(raw) / len(zlib.compress(raw)))
    assert compression_ratio(text) < COMPRESSION_RATIO_THRESHOLD
    repetitive = " I don't know." * 30
    assert compression_ratio(repetitive) > COMPRESSION_RATIO_THRESHOLD
    assert COMPRESSION_RATIO_THRESHOLD == 2.4
    utf8 = "Größe café naïve " * 3  # measured in UTF-8 bytes, not characters
    assert compression_ratio(utf8) == pytest.approx(len(utf8.encode()) / len(zlib.compress(utf8.encode())))
