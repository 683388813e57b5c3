#!/usr/bin/env python3
"""Batch transcription: files, directories, glob patterns or a manifest to txt/json/srt/vtt files.

The same code as ``jax-realtime transcribe ... --output-dir DIR`` (see ``jax_realtime/batch.py``):

    python scripts/transcribe_batch.py recordings/ -o transcripts/
    python scripts/transcribe_batch.py "archive/**/*.mp3" --manifest more.jsonl -o out/ --formats txt,srt
    python scripts/transcribe_batch.py --manifest ../shared/eval/refs.jsonl -o out/   # ids name the outputs

Writes ``DIR/NAME.{txt,json,srt,vtt}`` per input and ``DIR/summary.jsonl``; skips inputs whose
outputs exist (run it again to resume); a file that cannot be read is reported and skipped.
Exit status: 0 all inputs transcribed (or skipped), 1 some failed, 2 nothing could be started.

Several hosts (``jax.distributed``): run the same command on every host with
``--num-processes N --process-id I --coordinator HOST0:PORT`` (on TPU pods and SLURM,
``--distributed`` alone); each process transcribes its share of the inputs.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jax_realtime import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (compilation, loading)")
    cli.add_transcribe_arguments(parser, output_dir_required=True)
    parser.set_defaults(func=cli.cmd_transcribe)
    return cli.main(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
