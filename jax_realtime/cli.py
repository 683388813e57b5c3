"""The library's commands of the ``jax-realtime`` command line (``server/cli.py`` adds ``serve``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from . import __version__


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="service config (TOML); flags override its [engine] table")
    parser.add_argument("--model", help="tiny.en (default, bundled), base, a checkpoint directory or a hub id")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    parser.add_argument("--cache-dir", help="converted weights and compiled programs (default ~/.cache/jax-realtime)")
    parser.add_argument("--word-timestamps", action="store_true", default=None,
                        help="word-level timestamps (compiles word alignment: [engine] word_timestamps = true); "
                             "serve: REST timestamp_granularities[]=word")


def config_from_args(args, **server):
    from .config import load_config

    return load_config(args.config, server=server, model=args.model, dtype=args.dtype, cache_dir=args.cache_dir,
                       word_timestamps=_word_timestamps(args) or None)


def _word_timestamps(args) -> bool:
    return bool(getattr(args, "word_timestamps", None)) or getattr(args, "cues", "segment") == "word"


def _engine(args):
    from .engine import Engine

    return Engine(config_from_args(args).engine)


def _options(args):
    from .longform import TranscribeOptions

    batch = args.output_dir is not None  # srt and vtt need timestamps
    return TranscribeOptions(args.language, args.task, args.timestamps or batch, args.prompt, strategy=args.strategy,
                             word_timestamps=_word_timestamps(args))


def cmd_transcribe(args) -> int:
    from .batch import expand_inputs

    if not args.inputs and not args.manifest:
        print("error: give audio files, directories, glob patterns or --manifest", file=sys.stderr)
        return 2
    if args.distributed or args.coordinator or args.num_processes:
        if args.output_dir is None:
            print("error: several processes write their outputs to files: give --output-dir", file=sys.stderr)
            return 2
        from .sharding import init_distributed

        init_distributed(args.coordinator, args.num_processes, args.process_id)
    items = expand_inputs(args.inputs, args.manifest)
    if not items:
        print("error: no audio files found", file=sys.stderr)
        return 2
    if args.output_dir is not None:
        return _transcribe_to_files(args, items)
    from .longform import check_options
    from .transcribe import transcribe_files

    engine = _engine(args)
    options = _options(args)
    check_options(engine, options)
    results = transcribe_files(engine, [item.path for item in items], options, args.rows)
    failed = False
    objects = []
    several = len(items) > 1
    for r in results:
        if r.error:
            failed = True
            print(f"error: {r.error}", file=sys.stderr)
            if args.format == "text":
                continue
        objects.append(r.as_dict(args.timestamps))
    if args.format == "json":
        print(json.dumps(objects if several else (objects[0] if objects else {}), ensure_ascii=False, indent=2))
    elif args.format == "jsonl":
        for obj in objects:
            print(json.dumps(obj, ensure_ascii=False))
    else:
        for obj in objects:
            prefix = f"{obj['file']}: " if several else ""
            if "words" in obj:
                for w in obj["words"]:
                    print(f"{prefix}[{w['start']:6.2f} -> {w['end']:6.2f}] {w['word']}")
            elif args.timestamps:
                for s in obj["segments"]:
                    print(f"{prefix}[{s['start']:6.2f} -> {s['end']:6.2f}] {s['text']}")
            else:
                print(prefix + obj["text"])
    return 1 if failed else 0


def _transcribe_to_files(args, items) -> int:
    from . import batch
    from .longform import check_options

    extensions = [e.strip() for e in args.formats.split(",") if e.strip()]
    unknown = [e for e in extensions if e not in batch.OUTPUT_FORMATS]
    if unknown or not extensions:
        print(f"error: --formats takes a comma-separated subset of {','.join(batch.OUTPUT_FORMATS)}", file=sys.stderr)
        return 2
    engine = _engine(args)
    options = _options(args)
    check_options(engine, options)
    report = batch.run(engine, items, args.output_dir, options, extensions, overwrite=args.overwrite,
                       max_rows=args.rows, progress=not args.no_progress, word_cues=args.cues == "word")
    from .sharding import process_index

    if process_index() == 0:
        speed = f", {report.audio_s / report.wall_s:.1f} audio-s/s" if report.wall_s > 0 and report.audio_s else ""
        print(f"{report.done} transcribed, {report.skipped} skipped (outputs exist), {report.failed} failed; "
              f"{report.audio_s / 3600:.3f} audio-h in {report.wall_s:.1f} s{speed}; "
              f"summary: {os.path.join(args.output_dir, 'summary.jsonl')}", file=sys.stderr)
    return report.exit_status


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_transcribe_arguments(t: argparse.ArgumentParser, output_dir_required: bool = False) -> None:
    """The arguments of ``jax-realtime transcribe`` (``scripts/transcribe_batch.py`` uses them too)."""
    t.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="audio files (wav, flac, ogg, mp3; any sample rate), directories (searched recursively) "
                        "or quoted glob patterns")
    t.add_argument("--manifest", help="a file listing inputs: one path a line, or jsonl with 'audio' (or 'path', "
                                      "'wav', 'file') and an optional 'id' naming the outputs")
    add_engine_flags(t)
    t.add_argument("--language", help="ISO code (default: detect on multilingual models, English otherwise)")
    t.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    t.add_argument("--timestamps", action="store_true", help="decode with timestamps and print segments")
    t.add_argument("--prompt", help="text that conditions the decoder (names, spelling, style)")
    t.add_argument("--strategy", choices=["seek", "chunked"], default="seek",
                   help="how audio longer than 30 s is stitched (see jax_realtime/longform.py)")
    t.add_argument("--format", choices=["text", "json", "jsonl"], default="text",
                   help="what is printed without --output-dir")
    t.add_argument("-o", "--output-dir", required=output_dir_required,
                   help="write NAME.txt/.json/.srt/.vtt per input and summary.jsonl here; resumable")
    t.add_argument("--formats", default="txt,json,srt,vtt", help="with --output-dir: the files to write")
    t.add_argument("--cues", choices=["segment", "word"], default="segment",
                   help="with --output-dir: SRT/WebVTT cues per segment or per word (word implies --word-timestamps)")
    t.add_argument("--overwrite", action="store_true", help="with --output-dir: redo inputs whose outputs exist")
    t.add_argument("--rows", type=_positive, help="windows decoded per round (default: 2x the largest batch bucket)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = t.add_argument_group("several processes (jax.distributed)")
    d.add_argument("--distributed", action="store_true",
                   help="join a multi-process run; on TPU pods and SLURM JAX finds the others itself, elsewhere "
                        "give the three options below")
    d.add_argument("--coordinator", help="HOST:PORT of process 0 (omit on TPU pods/SLURM: found automatically)")
    d.add_argument("--num-processes", type=int, help="processes in the run")
    d.add_argument("--process-id", type=int, help="this process's index, 0 ... N-1")


def build_parser(extend=None) -> argparse.ArgumentParser:
    """The parser; ``extend(subparsers)`` may add commands (the server adds ``serve``)."""
    parser = argparse.ArgumentParser(prog="jax-realtime", description="Whisper in JAX: realtime and offline speech to text")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (compilation, loading)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio of any length: files, directories, globs, a manifest")
    add_transcribe_arguments(t)
    t.set_defaults(func=cmd_transcribe)
    if extend is not None:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    level = logging.INFO if args.verbose or getattr(args, "log_info", False) else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .audio import AudioError
    from .config import ConfigError
    from .weights import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, AudioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
