"""Word error rate as the project reports it: Whisper's English normaliser, then corpus-level WER.

Both sides are normalised with openai-whisper's English text normaliser (``whisper-normalizer``
on PyPI), which spells numbers the same way on both sides, drops punctuation and case; WER is
the total of substitutions, deletions and insertions over the total reference words (``jiwer``).
These two libraries come with the ``test`` extra.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from typing import Iterable


@functools.lru_cache(maxsize=1)
def _normalizer():
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("scoring needs whisper-normalizer and jiwer: pip install -e '.[test]'") from exc
    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _normalizer()(text)


def word_errors(references: Iterable[str], hypotheses: Iterable[str]) -> tuple[int, int]:
    """(errors, reference words) after normalisation; empty references are skipped."""
    import jiwer

    pairs = [(normalize(r), normalize(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        return 0, 0
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    errors = out.substitutions + out.deletions + out.insertions
    return errors, out.hits + out.substitutions + out.deletions


def wer(references: Iterable[str], hypotheses: Iterable[str]) -> float:
    """Corpus WER in percent."""
    errors, words = word_errors(references, hypotheses)
    return 100.0 * errors / max(words, 1)


def load_refs(path: str | os.PathLike, language: str | None = None) -> list[dict]:
    """Rows of a refs.jsonl (``id``, ``wav`` relative to the file, ``text``, ``corpus``, ...).

    ``wav`` is made absolute.
    """
    base = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row["wav"] = os.path.join(base, row["wav"])
                if language is None or row.get("language") == language:
                    rows.append(row)
    return rows


def corpus_of(row: dict) -> str:
    return row.get("corpus") or row["id"].split("-")[0]


def score(refs: list[dict], hypotheses: dict[str, str]) -> dict[str, dict]:
    """WER per corpus and overall: ``{corpus: {"wer", "errors", "words", "clips"}}``.

    ``hypotheses`` maps clip id to text; a clip without a hypothesis counts as empty output.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in refs:
        groups[corpus_of(row)].append(row)
        groups["overall"].append(row)
    table = {}
    for name, rows in groups.items():
        errors, words = word_errors([r["text"] for r in rows], [hypotheses.get(r["id"], "") for r in rows])
        table[name] = {"wer": 100.0 * errors / max(words, 1), "errors": errors, "words": words, "clips": len(rows)}
    return table
