"""The service TOML a test (or a script's) server runs on: one writer for every test module."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

# Small bucket set for tests: compiles in seconds, still exercises batching, a short window with
# its fallback to 30 s, and both prompt buckets.
TEST_BUCKETS = dict(batch_buckets=(1, 4), window_buckets=(10.0, 30.0), prompt_buckets=(8, 232))


def toml_value(value) -> str:
    """One TOML value (booleans, numbers, strings, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_config(path: str | Path, base: str | Path | None = None, engine: dict | None = None,
                 **server) -> Path:
    """Write a service config to ``path``: the tables of ``base`` (a service TOML), else tiny.en on
    :data:`TEST_BUCKETS`; ``engine`` keys set in ``[engine]``, the other keywords in ``[server]``."""
    if base is not None:
        with open(base, "rb") as f:
            config = tomllib.load(f)
    else:
        config = {"engine": {"model": "tiny.en", **TEST_BUCKETS}}
    config.setdefault("engine", {}).update(engine or {})
    if server:
        config.setdefault("server", {}).update(server)
    lines = []
    for table, values in config.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
