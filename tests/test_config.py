"""EngineConfig defaults and validation; load_config from TOML files, overrides and its errors."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from jax_realtime.config import (
    DEFAULT_MODEL,
    MIN_LARGEST_PROMPT_BUCKET,
    ConfigError,
    EngineConfig,
    ServiceConfig,
    default_cache_dir,
    load_config,
)

# -- EngineConfig ----------------------------------------------------------------------------------


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_REALTIME_CACHE", str(tmp_path / "cache"))
    c = EngineConfig()
    assert c.model == DEFAULT_MODEL == "tiny.en"
    assert c.dtype == "float32"
    assert c.batch_buckets == (1, 4, 8)
    assert c.window_buckets == (10.0, 20.0, 30.0)
    assert c.prompt_buckets == (8, 64, 232)
    assert max(c.prompt_buckets) >= 228  # Whisper's longest prompt: 223 + <|startofprev|> + 4
    assert c.window_fallback is True and c.compilation_cache is True
    assert c.cache_dir == str(tmp_path / "cache")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_REALTIME_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("JAX_REALTIME_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "jax-realtime")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "jax-realtime")


def test_buckets_are_sorted_and_deduplicated():
    c = EngineConfig(batch_buckets=(8, 1, 4, 4, 1), window_buckets=(30, 10, 15.5, 10.0), prompt_buckets=[232, 8, 64, 8])
    assert c.batch_buckets == (1, 4, 8)
    assert c.window_buckets == (10.0, 15.5, 30.0)
    assert all(isinstance(w, float) for w in c.window_buckets)
    assert c.prompt_buckets == (8, 64, 232)


def test_frozen():
    c = EngineConfig()
    with pytest.raises(ValidationError):
        c.model = "base"


def _invalid(field: str, **kwargs) -> str:
    with pytest.raises(ValidationError) as info:
        EngineConfig(**kwargs)
    text = str(info.value)
    assert field in text, text
    return text


@pytest.mark.parametrize("field", ["batch_buckets", "prompt_buckets"])
@pytest.mark.parametrize("bad", [(0, 4), (4, -1), ()])
def test_non_positive_or_empty_buckets(field, bad):
    kwargs = {field: bad}
    if field == "prompt_buckets" and bad != ():
        kwargs[field] = bad + (232,)
    _invalid(field, **kwargs)


@pytest.mark.parametrize(
    "bad", [(10.01, 30), (0.03, 30), (10, 30.5), (10, 31), (0, 30), (-10, 30), (), (10, float("nan"), 30)]
)
def test_invalid_windows(bad):
    _invalid("window_buckets", window_buckets=bad)


def test_window_multiples_of_20ms_are_accepted():
    c = EngineConfig(window_buckets=(0.02, 7.5, 14.98, 30))
    assert c.window_buckets == (0.02, 7.5, 14.98, 30.0)


def test_full_window_is_required():
    text = _invalid("window_buckets", window_buckets=(10, 20))
    assert "30" in text


def test_prompt_buckets_must_hold_whispers_longest_prompt():
    """The largest bucket must hold 223 tokens of previous text + <|startofprev|> + 4: a smaller one
    would leave a long streaming prompt (or forced prefix) without a bucket."""
    for bad in ((4, 7), (8,), (8, 64, 227)):
        text = _invalid("prompt_buckets", prompt_buckets=bad)
        assert f"the largest bucket ({max(bad)}) must hold Whisper's longest prompt, 228 tokens" in text, text
    assert MIN_LARGEST_PROMPT_BUCKET == 228
    assert EngineConfig(prompt_buckets=(8, 228)).prompt_buckets == (8, 228)
    assert EngineConfig(prompt_buckets=(232,)).prompt_buckets == (232,)


@pytest.mark.parametrize("field,bad", [("dtype", "int8"), ("model", ""), ("batch_buckets", (1.5, 4)),
                                       ("batch_buckets", "four"), ("window_fallback", "perhaps")])
def test_wrong_values(field, bad):
    _invalid(field, **{field: bad})


def test_unknown_field():
    _invalid("batchbuckets", batchbuckets=(1,))


# -- load_config -----------------------------------------------------------------------------------

def _write(tmp_path, text: str, name: str = "service.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_load_defaults_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, ServiceConfig)
    assert cfg.engine == EngineConfig(cache_dir=cfg.engine.cache_dir)


def test_load_from_toml(tmp_path):
    path = _write(tmp_path, """
[engine]
model = "base"
dtype = "bfloat16"
batch_buckets = [8, 2, 2]
window_buckets = [30, 15]
prompt_buckets = [8, 232]
window_fallback = false
cache_dir = "/tmp/jr-cache"
compilation_cache = false
""")
    e = load_config(path).engine
    assert e.model == "base" and e.dtype == "bfloat16"
    assert e.batch_buckets == (2, 8)
    assert e.window_buckets == (15.0, 30.0)
    assert e.prompt_buckets == (8, 232)
    assert e.window_fallback is False and e.compilation_cache is False
    assert e.cache_dir == "/tmp/jr-cache"
    # a path object works too, and an empty file means defaults
    from pathlib import Path

    assert load_config(Path(path)).engine == e
    assert load_config(_write(tmp_path, "", "empty.toml")).engine.batch_buckets == (1, 4, 8)


def test_overrides(tmp_path):
    path = _write(tmp_path, '[engine]\nmodel = "base"\ndtype = "float16"\nbatch_buckets = [1, 2]\n')
    e = load_config(path, model="tiny.en", dtype=None, batch_buckets=(16, 4)).engine
    assert e.model == "tiny.en"  # replaced
    assert e.dtype == "float16"  # None: ignored, the file's value stays
    assert e.batch_buckets == (4, 16)  # replaced, then validated
    assert load_config(None, dtype="bfloat16").engine.dtype == "bfloat16"


def _config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_file(tmp_path):
    path = str(tmp_path / "missing.toml")
    msg = _config_error(path)
    assert msg.startswith(path) and "cannot read" in msg


def test_directory_instead_of_a_file(tmp_path):
    msg = _config_error(str(tmp_path))
    assert msg.startswith(str(tmp_path)) and "cannot read" in msg


def test_invalid_toml(tmp_path):
    path = _write(tmp_path, '[engine\nmodel = "base"\n')
    msg = _config_error(path)
    assert msg.startswith(path) and "TOML" in msg
    path = _write(tmp_path, '[engine]\nmodel = base\n', "unquoted.toml")
    assert _config_error(path).startswith(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[engine]\nmodel = "caf\xe9"\n'.encode("latin-1"))
    msg = _config_error(str(path))
    assert msg.startswith(str(path))


@pytest.mark.parametrize("text,key", [
    ('[engine]\nmodle = "base"\n', "engine.modle"),
    ('[engine]\nmodel = "base"\nbatch_size = 4\n', "engine.batch_size"),
    ('[listener]\nport = 8000\n', "listener"),
    ('[server]\nport_number = 8000\n', "server.port_number"),
    ('[stream]\nstep = 1.0\n', "stream.step"),
])
def test_unknown_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    msg = _config_error(path)
    assert msg.startswith(path) and key in msg


@pytest.mark.parametrize("text,key", [
    ('[engine]\nbatch_buckets = "four"\n', "engine.batch_buckets"),
    ('[engine]\nbatch_buckets = [1, "x"]\n', "engine.batch_buckets.1"),
    ('[engine]\ndtype = 16\n', "engine.dtype"),
    ('[engine]\ndtype = "int8"\n', "engine.dtype"),
    ('[engine]\nwindow_fallback = [true]\n', "engine.window_fallback"),
    ('[engine]\nmodel = 3\n', "engine.model"),
    ('engine = "tiny.en"\n', "engine"),
])
def test_wrong_type(tmp_path, text, key):
    path = _write(tmp_path, text)
    msg = _config_error(path)
    assert msg.startswith(path) and f"{key}:" in msg


@pytest.mark.parametrize("text,needle", [
    ("[engine]\nbatch_buckets = [0, 4]\n", "engine.batch_buckets"),
    ("[engine]\nwindow_buckets = [10.01, 30]\n", "engine.window_buckets"),
    ("[engine]\nwindow_buckets = [10, 20]\n", "window_buckets"),  # whole-model rule: named in the text
])
def test_invalid_values_in_file(tmp_path, text, needle):
    path = _write(tmp_path, text)
    msg = _config_error(path)
    assert msg.startswith(path) and needle in msg


def test_several_problems_are_all_reported(tmp_path):
    path = _write(tmp_path, '[engine]\ndtype = "int8"\nmodle = "x"\n')
    msg = _config_error(path)
    assert "engine.dtype" in msg and "engine.modle" in msg


def test_bad_override_names_the_key(tmp_path):
    msg = _config_error(None, batch_buckets=(0,))
    assert msg.startswith("<defaults>") and "engine.batch_buckets" in msg
    path = _write(tmp_path, '[engine]\nmodel = "base"\n')
    msg = _config_error(path, window_buckets=(10,))
    assert msg.startswith(path) and "window_buckets" in msg
    msg = _config_error(path, colour="blue")
    assert "engine.colour" in msg


# -- [server]: API keys, upload cap, request timeout -------------------------------------------------


def test_server_defaults_have_no_keys():
    s = ServiceConfig().server
    assert s.api_keys == () and s.api_key_file is None
    assert s.effective_api_keys({}) == ()
    assert s.max_upload_mb == 25.0 and s.max_upload_bytes == 25 * 1024 * 1024
    assert s.request_timeout_s == 600.0


def test_api_keys_from_every_source(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# one key per line\nfile-a\n\n   file-b  \n# file-c is commented out\nflag-1\n")
    config = load_config(server={"api_keys": ("flag-1", "flag-2"), "api_key_file": str(keys)})
    assert config.server.effective_api_keys({"JAX_REALTIME_API_KEY": " env-1 , env-2,"}) == (
        "flag-1", "flag-2", "file-a", "file-b", "env-1", "env-2")  # duplicates once, in order
    assert config.server.effective_api_keys({"JAX_REALTIME_API_KEY": "  "}) == ("flag-1", "flag-2", "file-a", "file-b")


@pytest.mark.parametrize("text,needle", [
    ('[server]\napi_keys = ["good", "has space"]\n', "server.api_keys: Value error, key 2: an API key may only hold"),
    ('[server]\napi_keys = [""]\n', "key 1: an API key must not be empty"),
    ('[server]\napi_keys = ["caf\u00e9"]\n', "visible ASCII"),
    ('[server]\nmax_upload_mb = 0\n', "server.max_upload_mb"),
    ('[server]\nrequest_timeout_s = -1\n', "server.request_timeout_s"),
    ('[server]\napi_key = "my-secret"\n', "server.api_key"),  # a typo: still not echoed
])
def test_bad_server_values(tmp_path, text, needle):
    path = _write(tmp_path, text)
    msg = _config_error(path)
    assert msg.startswith(path) and needle in msg, msg
    for secret in ("has space", "caf\u00e9", "my-secret"):  # keys are never echoed
        assert secret not in msg, msg


def test_api_key_file_problems_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    assert f"api_key_file {missing}: cannot read" in _config_error(None, server={"api_key_file": str(missing)})
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but comments\n\n")
    assert f"api_key_file {empty}: holds no key" in _config_error(None, server={"api_key_file": str(empty)})
    bad = tmp_path / "bad.txt"
    bad.write_text("ok-key\nsecret with spaces\n")
    msg = _config_error(None, server={"api_key_file": str(bad)})
    assert f"api_key_file {bad}, key 2: an API key may only hold" in msg and "secret with" not in msg


def test_api_key_file_takes_one_path_or_several(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("key-a\n")
    b.write_text("key-b\nkey-a\n")
    one = load_config(_write(tmp_path, f'[server]\napi_key_file = "{a}"\n'))
    assert one.server.api_key_files == (str(a),) and one.server.effective_api_keys({}) == ("key-a",)
    both = load_config(_write(tmp_path, f'[server]\napi_key_file = ["{a}", "{b}"]\n'))
    assert both.server.api_key_files == (str(a), str(b))
    assert both.server.effective_api_keys({}) == ("key-a", "key-b")
    assert f"api_key_file {tmp_path / 'c.txt'}: cannot read" in _config_error(
        None, server={"api_key_file": [str(a), str(tmp_path / "c.txt")]})


def test_serve_flags_add_to_the_configs_keys(tmp_path):
    """``--api-key``/``--api-key-file`` add to the config's api_keys and api_key_file (and the
    environment's keys), as the README says: every source is accepted together."""
    from jax_realtime.cli import build_parser
    from server.cli import add_serve, serve_config

    config_file, flag_file = tmp_path / "config-keys.txt", tmp_path / "flag-keys.txt"
    config_file.write_text("config-file-key\n")
    flag_file.write_text("flag-file-key\n")
    path = _write(tmp_path, f'[server]\napi_keys = ["config-key"]\napi_key_file = "{config_file}"\n')
    parser = build_parser(add_serve)
    args = parser.parse_args(["serve", "--config", path, "--api-key", "flag-1", "--api-key", "flag-2",
                              "--api-key-file", str(flag_file)])
    server = serve_config(args).server
    assert server.effective_api_keys({"JAX_REALTIME_API_KEY": "env-key"}) == (
        "config-key", "flag-1", "flag-2", "config-file-key", "flag-file-key", "env-key")
    assert serve_config(parser.parse_args(["serve", "--config", path])).server.effective_api_keys({}) == (
        "config-key", "config-file-key")


def test_new_server_limits_defaults_and_validation(tmp_path):
    s = ServiceConfig().server
    assert s.max_audio_s == 3 * 3600 and s.max_concurrent_requests == 4 and s.max_pending is None
    assert s.effective_max_pending == 2 * (64 + 4) == 136  # 2 x (max_sessions + max_concurrent_requests)
    s = load_config(server={"max_sessions": 10, "max_concurrent_requests": 2}).server
    assert s.effective_max_pending == 24
    assert load_config(server={"max_pending": 7}).server.effective_max_pending == 7
    for key, bad in (("max_audio_s", 0), ("max_concurrent_requests", 0), ("max_pending", 0)):
        assert f"server.{key}" in _config_error(None, server={key: bad})


def test_bad_env_key_is_reported():
    config = load_config(server={"api_keys": ("k",)})
    with pytest.raises(ValueError, match=r"\$JAX_REALTIME_API_KEY: an API key may only hold"):
        config.server.effective_api_keys({"JAX_REALTIME_API_KEY": "ok,not ok"})
