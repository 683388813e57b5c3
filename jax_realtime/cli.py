"""The library's commands of the ``jax-realtime`` command line (``server/cli.py`` adds ``serve``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="service config (TOML); flags override its [engine] table")
    parser.add_argument("--model", help="tiny.en (default, bundled), base, a checkpoint directory or a hub id")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    parser.add_argument("--cache-dir", help="converted weights and compiled programs (default ~/.cache/jax-realtime)")


def config_from_args(args, **server):
    from .config import load_config

    return load_config(args.config, server=server, model=args.model, dtype=args.dtype, cache_dir=args.cache_dir)


def _engine(args):
    from .engine import Engine

    return Engine(config_from_args(args).engine)


def cmd_transcribe(args) -> int:
    from .transcribe import TranscribeOptions, transcribe_files

    engine = _engine(args)
    options = TranscribeOptions(args.language, args.task, args.timestamps, args.prompt)
    results = transcribe_files(engine, args.files, options)
    failed = False
    objects = []
    for r in results:
        if r.error:
            failed = True
            print(f"error: {r.error}", file=sys.stderr)
            if args.format == "text":
                continue
        objects.append(r.as_dict(args.timestamps))
    if args.format == "json":
        print(json.dumps(objects if len(args.files) > 1 else (objects[0] if objects else {}), ensure_ascii=False, indent=2))
    elif args.format == "jsonl":
        for obj in objects:
            print(json.dumps(obj, ensure_ascii=False))
    else:
        for obj in objects:
            prefix = f"{obj['file']}: " if len(args.files) > 1 else ""
            if args.timestamps:
                for s in obj["segments"]:
                    print(f"{prefix}[{s['start']:6.2f} -> {s['end']:6.2f}] {s['text']}")
            else:
                print(prefix + obj["text"])
    return 1 if failed else 0


def build_parser(extend=None) -> argparse.ArgumentParser:
    """The parser; ``extend(subparsers)`` may add commands (the server adds ``serve``)."""
    parser = argparse.ArgumentParser(prog="jax-realtime", description="Whisper in JAX: realtime and offline speech to text")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (compilation, loading)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe audio files of any length")
    t.add_argument("files", nargs="+", metavar="FILE", help="wav, flac, ogg or mp3; any sample rate")
    add_engine_flags(t)
    t.add_argument("--language", help="ISO code (default: detect on multilingual models, English otherwise)")
    t.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    t.add_argument("--timestamps", action="store_true", help="decode with timestamps and print segments")
    t.add_argument("--prompt", help="text that conditions the decoder (names, spelling, style)")
    t.add_argument("--format", choices=["text", "json", "jsonl"], default="text")
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
