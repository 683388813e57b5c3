"""The engine on real tiny.en weights: static shapes, batching, sharding, bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ROOT, load_clip, load_refs

from jax_realtime import sharding
from jax_realtime.audio import SAMPLE_RATE
from jax_realtime.engine import DecodeRequest, compile_stats


@pytest.fixture(scope="module")
def english_clips():
    return [load_clip(r) for r in load_refs() if r["language"] == "en"]


def test_no_compilation_after_warmup(tiny_engine, english_clips):
    """60 calls of mixed lengths, batch sizes, windows, modes and prompts: nothing compiles."""
    rng = random.Random(0)
    long_clip = np.concatenate(english_clips[-3:])[: 25 * SAMPLE_RATE]  # needs the 30 s window
    prompt = tiny_engine.tokenizer.encode(" The quick brown fox jumps over the lazy dog." * 12)
    before = compile_stats()["compilations"]
    calls = 0
    for i in range(60):
        size = rng.choice([1, 2, 3, 4, 5, 7])  # 5 and 7 exceed the largest bucket: split, then padded
        requests = []
        for _ in range(size):
            audio = long_clip if rng.random() < 0.1 else rng.choice(english_clips)
            cut = rng.randint(SAMPLE_RATE // 2, len(audio)) if rng.random() < 0.3 else len(audio)
            requests.append(DecodeRequest(
                audio[:cut],
                timestamps=rng.random() < 0.5,
                prompt=prompt[: rng.choice([0, 5, 300])],
            ))
        results = tiny_engine.decode(requests)
        assert len(results) == size
        calls += 1
    assert calls >= 50
    assert compile_stats()["compilations"] == before


def test_batch_equals_one_by_one(tiny_engine, english_clips):
    clips = english_clips[:6]
    batched = tiny_engine.decode([DecodeRequest(a) for a in clips])
    single = [tiny_engine.decode([DecodeRequest(a)])[0] for a in clips]
    assert [r.tokens for r in batched] == [r.tokens for r in single]
    assert all(r.text.strip() for r in batched)


def test_results_keep_request_order_across_windows(tiny_engine, english_clips):
    short, long_ = english_clips[0], np.concatenate(english_clips[-3:])[: 20 * SAMPLE_RATE]
    results = tiny_engine.decode([DecodeRequest(long_), DecodeRequest(short), DecodeRequest(long_)])
    assert [r.window_s for r in results] == [30.0, 10.0, 30.0]
    assert results[0].tokens == results[2].tokens
    assert results[1].tokens == tiny_engine.decode([DecodeRequest(short)])[0].tokens


def test_prompt_is_used_and_counted(tiny_engine, english_clips):
    audio = english_clips[5]
    plain = tiny_engine.decode([DecodeRequest(audio)])[0]
    words = tiny_engine.tokenizer.encode(" Mister Quilter, the apostle of the middle classes.")
    prompted = tiny_engine.decode([DecodeRequest(audio, prompt=words)])[0]
    # <|startofprev|> + prompt + <|startoftranscript|> + <|notimestamps|>
    assert prompted.prompt_tokens == len(words) + 3
    assert plain.prompt_tokens == 2
    assert prompted.text.strip()


def test_timestamps_mode_gives_segments_inside_the_clip(tiny_engine, english_clips):
    audio = english_clips[-1]
    result = tiny_engine.decode([DecodeRequest(audio, timestamps=True)])[0]
    assert result.segments, result
    begin = tiny_engine.tokenizer.timestamp_begin
    assert result.tokens[0] >= begin  # the first sampled token is a timestamp
    for seg in result.segments:
        assert 0.0 <= seg.start <= seg.end <= result.duration_s + 1e-6
    assert "".join(s.text for s in result.segments).strip() == result.text.strip()


def test_silence_has_high_no_speech_probability(tiny_engine, english_clips):
    silence, speech = tiny_engine.decode([DecodeRequest(np.zeros(3 * SAMPLE_RATE, np.float32)),
                                          DecodeRequest(english_clips[4])])
    assert silence.no_speech_prob > 0.5 > speech.no_speech_prob


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(audio=np.zeros(31 * SAMPLE_RATE, np.float32)), "at most 30 s"),
        (dict(audio=np.zeros((2, 16000), np.float32)), "mono"),
        (dict(audio=np.zeros(16000, np.float32), language="de"), "English-only"),
        (dict(audio=np.zeros(16000, np.float32), task="translate"), "cannot translate"),
        (dict(audio=np.zeros(16000, np.float32), task="summarize"), "task must be"),
    ],
)
def test_bad_requests_are_rejected_with_a_reason(tiny_engine, request_kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_engine.decode([DecodeRequest(**request_kwargs)])


def test_a_min_window_beyond_every_bucket_is_a_value_error(tiny_engine):
    """Not a StopIteration (which, raised on the batcher's engine thread, never reaches the
    waiting future): a ValueError naming the problem, from ``window_for`` and ``decode``."""
    request = DecodeRequest(np.zeros(SAMPLE_RATE, np.float32), min_window_s=31.0)
    with pytest.raises(ValueError, match=r"min_window_s 31 is longer than the largest window bucket \(30 s\)"):
        tiny_engine.window_for(request)
    with pytest.raises(ValueError, match="min_window_s"):
        tiny_engine.decode([request])


def test_an_engine_refuses_prompt_buckets_too_small_for_whisper(engine_config):
    """EngineConfig refuses them; a config built without validation is refused by the engine."""
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import Engine

    unchecked = EngineConfig.model_construct(**{**engine_config.model_dump(), "prompt_buckets": (8, 64)})
    with pytest.raises(ValueError, match=r"prompt_buckets: the largest bucket \(64\) must hold this model's "
                                         r"longest prompt, 226 tokens"):
        Engine(unchecked)


def test_a_prompt_without_a_bucket_fails_its_batch_instead_of_hanging(tiny_engine, monkeypatch):
    """The engine as it would be with a largest prompt bucket of 8 (what the checks above refuse):
    a forced prefix of 20 tokens fits no bucket.  The batcher's future fails with the reason
    within seconds; before, the StopIteration of a ``next()`` pick left it pending forever."""
    import asyncio

    from jax_realtime.batcher import Batcher, EngineError

    monkeypatch.setattr(tiny_engine, "prompt_buckets", (8,))
    prefix = tiny_engine.tokenizer.encode(" one two three four five six seven eight nine ten eleven twelve")
    assert len(prefix) >= 12

    async def main():
        batcher = Batcher(tiny_engine)
        loop = asyncio.create_task(batcher.run())
        try:
            async with asyncio.timeout(60):
                with pytest.raises(EngineError, match="does not fit the largest prompt bucket"):
                    await batcher.submit("a", DecodeRequest(np.zeros(SAMPLE_RATE, np.float32), prefix=prefix))
        finally:
            await batcher.close()
            loop.cancel()

    asyncio.run(main())


def test_max_new_tokens_stops_a_request_early(tiny_engine, english_clips):
    clips = english_clips[:3]
    full = tiny_engine.decode([DecodeRequest(a, timestamps=True) for a in clips])
    capped = tiny_engine.decode([DecodeRequest(a, timestamps=True, max_new_tokens=5) for a in clips])
    assert all(len(f.tokens) > 5 for f in full)
    assert [c.tokens for c in capped] == [f.tokens[:5] for f in full]  # greedy: the same first tokens
    assert all(c.truncated and not c.hit_token_limit for c in capped)
    assert not any(f.truncated for f in full)


def test_every_bucket_is_compiled_by_warmup(tiny_engine):
    assert tiny_engine.describe()["compiled_buckets"] == len(tiny_engine.buckets) == 2 * 2 * 2


SHARDING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    from conftest import load_clip, load_refs
    from jax_realtime.config import EngineConfig
    from jax_realtime.engine import DecodeRequest, Engine

    assert jax.device_count() == 4, jax.devices()
    config = EngineConfig(model="tiny.en", batch_buckets=(4,), window_buckets=(10.0, 30.0), prompt_buckets=(8, 232))
    clips = [load_clip(r) for r in load_refs() if r["language"] == "en"][:7]
    requests = [DecodeRequest(a, timestamps=(i % 2 == 1)) for i, a in enumerate(clips)]
    sharded = Engine(config)
    single = Engine(config, devices=jax.devices()[:1])
    tensor = Engine(config.model_copy(update={{"model_parallelism": 2}}))  # 2 replicas, each on 2 devices
    fc1 = tensor.weights["params"]["decoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    print(json.dumps({{
        "mesh": dict(sharded.mesh.shape),
        "batch_buckets": list(sharded.batch_buckets),
        "sharded": [r.tokens for r in sharded.decode(requests)],
        "single": [r.tokens for r in single.decode(requests)],
        "tensor_mesh": dict(tensor.mesh.shape),
        "tensor": [r.tokens for r in tensor.decode(requests)],
        "fc1_shard": list(fc1.addressable_shards[0].data.shape), "fc1": list(fc1.shape),
        "params_bytes": [single.memory()["params"], tensor.memory()["params"]],
    }}))
    """
)


def test_sharded_over_four_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    script = SHARDING_SCRIPT.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 4, "model": 1}
    assert out["batch_buckets"] == [4]
    assert out["sharded"] == out["single"]
    assert all(out["sharded"])
    # parameters split over the model axis: half of each large matrix per device, same tokens
    assert out["tensor_mesh"] == {"data": 2, "model": 2}
    assert out["fc1_shard"] == [out["fc1"][0], out["fc1"][1] // 2]
    assert out["params_bytes"][1] < 0.6 * out["params_bytes"][0]
    assert out["tensor"] == out["single"]


@pytest.mark.parametrize("path, shape, n_model, spec", [
    (("decoder", "layers_0", "attn", "qkv", "kernel"), (384, 1152), 2, P(None, "model")),
    (("decoder", "layers_0", "attn", "qkv", "bias"), (1152,), 2, P("model")),
    (("encoder", "layers_3", "mlp", "fc2", "kernel"), (1536, 384), 4, P("model", None)),
    (("encoder", "layers_3", "mlp", "fc2", "bias"), (384,), 4, P()),  # added after the reduction
    (("decoder", "embed_tokens", "embedding"), (51864, 384), 2, P("model", None)),
    (("decoder", "embed_tokens", "embedding"), (51865, 384), 2, P()),  # does not divide: replicated
    (("projection",), (384, 51864), 8, P(None, "model")),
    (("encoder", "layers_0", "attn_ln", "scale"), (384,), 2, P()),
    (("decoder", "layers_0", "mlp", "fc1", "kernel"), (384, 1536), 1, P()),
])
def test_param_partition(path, shape, n_model, spec):
    assert sharding.param_partition(path, shape, n_model) == spec


@pytest.mark.parametrize("timestamps", [False, True])
def test_prefix_continues_the_models_own_output(tiny_engine, english_clips, timestamps):
    """Forcing the first tokens of an output and decoding on gives that same output back."""
    clips = english_clips[6:10]
    full = tiny_engine.decode([DecodeRequest(a, timestamps=timestamps) for a in clips])
    cut = [len(r.tokens) // 2 for r in full]
    continued = tiny_engine.decode([DecodeRequest(a, timestamps=timestamps, prefix=r.tokens[:k])
                                    for a, r, k in zip(clips, full, cut)])
    assert [r.tokens for r in continued] == [r.tokens for r in full]
    assert [r.sampled_tokens for r in continued] == [len(r.tokens) - k + 1 for r, k in zip(full, cut)]
    assert all(r.prompt_tokens == f.prompt_tokens + k for r, f, k in zip(continued, full, cut))


def test_sampling_is_seeded_and_temperature_zero_is_greedy(tiny_engine, english_clips):
    clips = english_clips[8:12]
    greedy = tiny_engine.decode([DecodeRequest(a) for a in clips])
    zero = tiny_engine.decode([DecodeRequest(a, temperature=0.0, seed=7) for a in clips])
    hot = [DecodeRequest(a, temperature=1.5, seed=i) for i, a in enumerate(clips)]
    first, again = tiny_engine.decode(hot), tiny_engine.decode(hot)
    other_seed = tiny_engine.decode([DecodeRequest(a, temperature=1.5, seed=100 + i) for i, a in enumerate(clips)])
    assert [r.tokens for r in zero] == [r.tokens for r in greedy]
    assert [r.tokens for r in first] == [r.tokens for r in again]  # same seed, same output
    assert [r.tokens for r in first] != [r.tokens for r in greedy]  # 1.5 is far from greedy on 4 clips
    assert [r.tokens for r in other_seed] != [r.tokens for r in first]
    assert all(r.temperature == 1.5 for r in first)
    with pytest.raises(ValueError, match="temperature"):
        tiny_engine.decode([DecodeRequest(clips[0], temperature=-0.1)])
