"""Word-level timestamps (``jax_realtime/alignment.py``, the engine's alignment, long-form words).

The reference is faster-whisper 1.2.1's ``word_timestamps=True`` on the same CTranslate2 files
(CPU, float32, greedy), through the functions of ``scripts/compare_word_timestamps.py`` (which
runs the same comparison on the 161 English clips of the eval set):

* alignment alone: faster-whisper's own tokens of each window aligned by ``Engine.align`` and
  handed to its segments: the same words by construction, and their times within 20 ms at the
  median and 100 ms at the 95th percentile of faster-whisper's;
* end to end: the engine's transcription with words; where the decoders agree on the words (most
  clips; they do not agree on every token: see the script), the same bounds.

Besides: the device math against direct loops of CTranslate2's own (DTW with its tie-breaking,
median filter with reflect padding), the alignment heads' sources, word splitting, and properties
every transcript with words must have (ordered, non-overlapping words inside their segments;
silence between two clips covered by no word; long-form words offset by their window; nothing
compiled after warm-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, load_clip, load_refs

from compare_word_timestamps import align_given, differences, faster_whisper, faster_whisper_model
from jax_realtime import alignment
from jax_realtime.audio import SAMPLE_RATE
from jax_realtime.engine import AlignRequest, DecodeRequest, compile_stats
from jax_realtime.longform import TranscribeOptions
from jax_realtime.transcribe import transcribe_batch

ENGLISH = [r for r in load_refs() if r["language"] == "en"]
WORDS = TranscribeOptions(language="en", word_timestamps=True)


@pytest.fixture(scope="module")
def clips():
    return [load_clip(r) for r in ENGLISH]


@pytest.fixture(scope="module")
def reference(clips):
    """faster-whisper's words of every English clip, and its windows (tokens, segments)."""
    return faster_whisper(faster_whisper_model(), clips)


# -- the device math -------------------------------------------------------------------------------

def ctranslate2_dtw(x: np.ndarray) -> np.ndarray:
    """CTranslate2's negative_dtw (src/dtw.cc) as loops, then openai's jump times: the first column
    of the path in each row."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, np.float32)
    trace = -np.ones((n + 1, m + 1), int)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = np.float32(-x[i - 1, j - 1]) + c
            trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = n, m, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        t = trace[i, j]
        i, j = (i - 1, j - 1) if t == 0 else (i - 1, j) if t == 1 else (i, j - 1)
    rows, cols = np.array(path[::-1]).T
    return cols[np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)]


def test_dtw_takes_ctranslate2s_path_including_ties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 14, 60)).astype(np.float32)
    x[1] = np.round(x[1])  # many equal costs: the tie-breaking must be CTranslate2's
    x[2] = 0.0  # every path costs the same
    n_rows, n_frames = np.array([14, 9, 14, 1, 3, 14]), np.array([60, 31, 60, 1, 2, 14])
    first = np.asarray(alignment.dtw_first_positions(x, n_rows, n_frames))
    for b in range(len(x)):
        np.testing.assert_array_equal(first[b, :n_rows[b]], ctranslate2_dtw(x[b, :n_rows[b], :n_frames[b]]))
        assert (first[b, n_rows[b]:] == x.shape[2]).all()  # rows past the text: untouched


def test_median_filter_reflects_at_each_rows_end():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 2, 3, 40)).astype(np.float32)
    n_frames = np.array([40, 11, 4, 3])
    filtered = np.asarray(alignment.median_filter(x, n_frames))
    for b, n in enumerate(n_frames):
        if n <= 3:  # too short to filter: passed through (CTranslate2, openai)
            np.testing.assert_array_equal(filtered[b, ..., :n], x[b, ..., :n])
            continue
        padded = np.pad(x[b, ..., :n], [(0, 0), (0, 0), (3, 3)], mode="reflect")
        expected = np.median(np.lib.stride_tricks.sliding_window_view(padded, 7, axis=-1), axis=-1)
        np.testing.assert_array_equal(filtered[b, ..., :n], expected)


def test_alignment_heads_from_the_checkpoint_openais_table_or_the_last_half(tiny_checkpoint_dir, tmp_path):
    heads, source = alignment.alignment_heads("tiny.en", tiny_checkpoint_dir, 4, 6)
    assert source == "checkpoint" and heads == ((1, 0), (2, 0), (2, 5), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4))
    # openai-whisper's table for tiny.en (base85 + gzip) holds the same heads as the CTranslate2 config
    assert alignment.alignment_heads("openai/whisper-tiny.en", str(tmp_path), 4, 6) == (heads, "openai")
    (tmp_path / "generation_config.json").write_text('{"alignment_heads": [[3, 1], [2, 4]]}')
    assert alignment.alignment_heads("mine", str(tmp_path), 4, 6) == (((2, 4), (3, 1)), "checkpoint")
    (tmp_path / "generation_config.json").write_text('{"alignment_heads": [[7, 1]]}')  # not this model's
    fallback = alignment.alignment_heads("mine", str(tmp_path), 4, 6)
    assert fallback == (tuple((layer, head) for layer in (2, 3) for head in range(6)), "fallback")


def test_words_split_on_spaces_or_code_points(tiny_engine):
    tok = tiny_engine.tokenizer
    tokens = tok.encode(" Hello, wonderful world! It's 1999.")
    words, pieces = alignment.split_to_word_tokens(tok, tokens + [tok.eot], "en")
    assert words[:-1] == [" Hello", ",", " wonderful", " world", "!", " It's", " 1999", "."]
    assert sum(pieces, []) == tokens + [tok.eot]
    japanese = tok.encode("こんにちは世界")  # byte-level pieces: words end on whole characters
    words, pieces = alignment.split_to_word_tokens(tok, japanese, "ja")
    assert "".join(words) == "こんにちは世界" and all("\ufffd" not in w for w in words) and len(words) > 1


# -- against faster-whisper -----------------------------------------------------------------------

def assert_close(d: dict, what: str) -> None:
    for key in ("starts", "ends"):
        median, p95 = 1000 * np.percentile(d[key], 50), 1000 * np.percentile(d[key], 95)
        assert median <= 20 and p95 <= 100, (what, key, median, p95)


def test_alignment_of_faster_whispers_tokens_matches_faster_whisper(tiny_engine, clips, reference):
    words, windows = reference
    d = differences(align_given(tiny_engine, clips, windows), words)
    assert all(d["same"]) and d["starts"].size == d["words"] > 100
    assert_close(d, "same tokens")


def test_transcription_words_match_faster_whisper(tiny_engine, clips, reference):
    words, _ = reference
    d = differences([[(w.word.strip(), w.start, w.end) for w in t.words]
                     for t in transcribe_batch(tiny_engine, clips, WORDS)], words)
    # where the two decoders agree on every word (they do not on every token)
    assert sum(d["same"]) >= len(clips) // 2, d["same"]
    assert d["starts"].size >= 0.9 * d["words"]
    assert_close(d, "transcribe")


# -- properties -----------------------------------------------------------------------------------

def check_words(transcript) -> list:
    """Every word inside its segment, words in order and never overlapping; returns all words."""
    previous = 0.0
    for s in transcript.segments:
        assert s.words, s
        assert s.start == s.words[0].start and s.end == s.words[-1].end, s
        for w in s.words:
            assert previous <= w.start <= w.end, (previous, w)
            assert s.start <= w.start and w.end <= s.end, (s, w)
            assert w.word.strip() and 0.0 < w.probability <= 1.0, w
            previous = w.end
        assert "".join(w.word for w in s.words) == s.text, s
    return transcript.words


def test_silence_between_two_clips_is_covered_by_no_word(tiny_engine, clips):
    first, second = clips[-1], clips[-3]  # 9.7 s and 6.9 s of speech
    gap = 4.0
    audio = np.concatenate([first, np.zeros(int(gap * SAMPLE_RATE), np.float32), second])
    (transcript,) = transcribe_batch(tiny_engine, [audio], WORDS)
    words = check_words(transcript)
    silence = (len(first) / SAMPLE_RATE, len(first) / SAMPLE_RATE + gap)
    inside = [w for w in words if w.end > silence[0] + 0.2 and w.start < silence[1] - 0.2]
    assert not inside, (silence, inside)
    assert any(w.end <= silence[0] + 0.2 for w in words) and any(w.start >= silence[1] - 0.2 for w in words)


def test_long_form_words_carry_their_windows_offset(tiny_engine, clips):
    """~75 s: several 30 s windows; each window's words are shifted by where the window starts."""
    pause = np.zeros(SAMPLE_RATE // 2, np.float32)
    audio = np.concatenate([part for clip in clips for part in (clip, pause)])
    (transcript,) = transcribe_batch(tiny_engine, [audio], WORDS)
    words = check_words(transcript)
    seeks = sorted({s.seek for s in transcript.segments})
    assert len(seeks) >= 3 and words[-1].end > 60
    for s in transcript.segments:
        assert s.start >= s.seek / 100 - 1e-9, s
    assert words[-1].end <= len(audio) / SAMPLE_RATE + 0.02


def test_decode_and_align_give_the_same_words(tiny_engine, clips):
    """``Engine.align`` (audio + tokens: a realtime session's committed text) agrees with the words a
    decode returns for the same window; without timestamps every text token is aligned."""
    requests = [DecodeRequest(c, word_timestamps=True) for c in clips[:5]]
    results = tiny_engine.decode(requests)
    aligned = tiny_engine.align([AlignRequest(c, r.tokens) for c, r in zip(clips[:5], results)])
    for result, words in zip(results, aligned):
        assert "".join(w.word for w in result.words.words) == result.text
        assert [(w.word, w.start, w.end) for w in words.words] == [(w.word, w.start, w.end) for w in result.words.words]
    assert tiny_engine.decode([DecodeRequest(clips[0])])[0].words is None  # not asked for


def test_nothing_compiles_after_warmup(tiny_engine, clips):
    """Words in every batch, window and alignment-token bucket, through decode and align: no
    compilation (the warm-up compiled them)."""
    before = compile_stats()["compilations"]
    long_text = tiny_engine.tokenizer.encode(" word" * 200)  # the 232-token bucket
    for n in (1, 4):
        tiny_engine.decode([DecodeRequest(c, timestamps=True, word_timestamps=True) for c in clips[-n:]])
        tiny_engine.decode([DecodeRequest(c, word_timestamps=True, min_window_s=30.0) for c in clips[:n]])
        tiny_engine.align([AlignRequest(c, long_text) for c in clips[:n]])
        tiny_engine.align([AlignRequest(c, long_text, min_window_s=30.0) for c in clips[:n]])
    assert compile_stats()["compilations"] == before


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    from conftest import load_clip, load_refs
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import AlignRequest, DecodeRequest, Engine

    assert jax.device_count() == 4, jax.devices()
    config = EngineConfig(model="tiny.en", batch_buckets=(4,), window_buckets=(10.0, 30.0), prompt_buckets=(8, 232),
                          word_timestamps=True, word_token_buckets=(232,))
    clips = [load_clip(r) for r in load_refs() if r["language"] == "en"][:6]
    engine = Engine(config)
    results = engine.decode([DecodeRequest(a, word_timestamps=True) for a in clips])
    aligned = engine.align([AlignRequest(a, r.tokens) for a, r in zip(clips, results)])
    print(json.dumps({{
        "mesh": dict(engine.mesh.shape),
        "decode": [[(w.word, w.start, w.end) for w in r.words.words] for r in results],
        "align": [[(w.word, w.start, w.end) for w in words.words] for words in aligned],
    }}))
    """
)


def test_words_on_four_devices_match_one_device(tiny_engine, clips):
    """A batch split over four (CPU) devices: the audio features stay sharded between decode and
    alignment; the words are those of one device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = SHARDED_SCRIPT.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 4, "model": 1}
    single = [[[w.word, w.start, w.end] for w in r.words.words]
              for r in tiny_engine.decode([DecodeRequest(a, word_timestamps=True) for a in clips[:6]])]
    assert out["decode"] == out["align"] == single
