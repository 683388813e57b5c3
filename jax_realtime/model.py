"""Whisper's encoder and decoder as Flax (linen) modules.

No jit and no I/O here: ``engine.py`` compiles, ``weights.py`` loads.  The decoder's state is
explicit: callers pass a preallocated self-attention cache in and get the updated cache back, and
the cross-attention keys/values are computed once per window by :meth:`Whisper.cross_kv`, not at
every step.

Layout of the self-attention cache: one ``(keys, values)`` pair per layer, each
``[batch, heads, cache_len, head_dim]`` (heads before positions, so no step transposes it).  Prompts are left-padded so that every row writes at the same
cache index; ``start[b]`` is the first real position of row ``b`` and keys before it are masked.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import ModelDims

Cache = tuple[tuple[jax.Array, jax.Array], ...]

_MASKED = -1e9  # large negative instead of -inf: a fully masked row must not produce NaN


def _split_heads(x, n_head: int):
    """[B, S, D] -> [B, H, S, D/H]: the layout attention and the caches use."""
    batch, length, d_model = x.shape
    return x.reshape(batch, length, n_head, d_model // n_head).transpose(0, 2, 1, 3)


QUERY_BLOCK = 512  # longest run of queries attended at once (see _attend)


def _attend(q, k, v, mask=None):
    """Scaled dot-product attention. q: [B, H, Sq, Dh], k/v: [B, H, Sk, Dh], mask: [B, Sq, Sk] (True=keep).

    Returns [B, Sq, H * Dh].  Long query runs (the encoder's 1000 or 1500 positions) are split into
    blocks of at most ``QUERY_BLOCK`` attended one after another: the block's scores then stay in
    cache, which makes a 30 s window's attention about twice as fast on CPU.  The softmax is
    normalised after multiplying by the values (one division per output instead of per score).
    """
    batch, n_head, s_q, d_head = q.shape
    blocks = next(n for n in range(1, s_q + 1) if s_q % n == 0 and s_q // n <= QUERY_BLOCK)
    q = q * jnp.asarray(d_head**-0.5, q.dtype)

    def attend(q_block, mask_block):
        scores = jnp.einsum("bhqd,bhkd->bhqk", q_block, k).astype(jnp.float32)
        if mask_block is not None:
            scores = jnp.where(mask_block[:, None, :, :], scores, _MASKED)
        weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)
        return out / jnp.sum(weights, axis=-1, keepdims=True).astype(out.dtype)

    if blocks == 1:
        out = attend(q, mask)
    else:
        size = s_q // blocks
        q_blocks = q.reshape(batch, n_head, blocks, size, d_head).transpose(2, 0, 1, 3, 4)
        if mask is None:
            out = jax.lax.map(lambda qb: attend(qb, None), q_blocks)
        else:
            mask_blocks = mask.reshape(batch, blocks, size, mask.shape[-1]).transpose(1, 0, 2, 3)
            out = jax.lax.map(lambda a: attend(*a), (q_blocks, mask_blocks))
        out = out.transpose(1, 2, 0, 3, 4).reshape(batch, n_head, s_q, d_head)
    return out.transpose(0, 2, 1, 3).reshape(batch, s_q, n_head * d_head)


class SelfAttention(nn.Module):
    """Fused q/k/v projection (Whisper's key projection has no bias: its bias slice is zero)."""

    n_state: int
    n_head: int
    dtype: Any = jnp.float32

    def setup(self):
        self.qkv = nn.Dense(3 * self.n_state, dtype=self.dtype, param_dtype=self.dtype)
        self.out = nn.Dense(self.n_state, dtype=self.dtype, param_dtype=self.dtype)

    def __call__(self, x, mask=None, cache=None, index=None):
        q, k, v = (_split_heads(t, self.n_head) for t in jnp.split(self.qkv(x), 3, axis=-1))
        if cache is not None:
            cache_k, cache_v = cache
            k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), index, axis=2)
            cache = (k, v)
        return self.out(_attend(q, k, v, mask)), cache


class CrossAttention(nn.Module):
    n_state: int
    n_head: int
    dtype: Any = jnp.float32

    def setup(self):
        self.q = nn.Dense(self.n_state, dtype=self.dtype, param_dtype=self.dtype)
        self.kv = nn.Dense(2 * self.n_state, dtype=self.dtype, param_dtype=self.dtype)
        self.out = nn.Dense(self.n_state, dtype=self.dtype, param_dtype=self.dtype)

    def keys_values(self, audio_features):
        """Keys and values of the audio, [B, H, T, Dh] each: computed once per window."""
        k, v = jnp.split(self.kv(audio_features), 2, axis=-1)
        return _split_heads(k, self.n_head), _split_heads(v, self.n_head)

    def __call__(self, x, kv):
        return self.out(_attend(_split_heads(self.q(x), self.n_head), kv[0], kv[1]))

    def with_scores(self, x, kv):
        """Like ``__call__``, also returning the scaled pre-softmax scores [B, H, S, T] (float32):
        word alignment reads them.  Decoding never calls this."""
        q = _split_heads(self.q(x), self.n_head)
        q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, kv[0]).astype(jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(kv[1].dtype), kv[1])
        batch, n_head, length, d_head = out.shape
        return self.out(out.transpose(0, 2, 1, 3).reshape(batch, length, n_head * d_head)), scores


class Mlp(nn.Module):
    n_state: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4 * self.n_state, dtype=self.dtype, param_dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=False)  # Whisper uses the exact (erf) GELU
        return nn.Dense(self.n_state, dtype=self.dtype, param_dtype=self.dtype, name="fc2")(x)


def _layer_norm(dtype, name=None):
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=dtype, name=name)


class EncoderLayer(nn.Module):
    n_state: int
    n_head: int
    dtype: Any = jnp.float32

    def setup(self):
        self.attn_ln = _layer_norm(self.dtype)
        self.attn = SelfAttention(self.n_state, self.n_head, self.dtype)
        self.mlp_ln = _layer_norm(self.dtype)
        self.mlp = Mlp(self.n_state, self.dtype)

    def __call__(self, x):
        x = x + self.attn(self.attn_ln(x))[0]
        return x + self.mlp(self.mlp_ln(x))


class DecoderLayer(nn.Module):
    n_state: int
    n_head: int
    dtype: Any = jnp.float32

    def setup(self):
        self.attn_ln = _layer_norm(self.dtype)
        self.attn = SelfAttention(self.n_state, self.n_head, self.dtype)
        self.cross_attn_ln = _layer_norm(self.dtype)
        self.cross_attn = CrossAttention(self.n_state, self.n_head, self.dtype)
        self.mlp_ln = _layer_norm(self.dtype)
        self.mlp = Mlp(self.n_state, self.dtype)

    def cross_kv(self, audio_features):
        return self.cross_attn.keys_values(audio_features)

    def __call__(self, x, mask, cache, index, cross_kv):
        y, cache = self.attn(self.attn_ln(x), mask, cache, index)
        x = x + y
        x = x + self.cross_attn(self.cross_attn_ln(x), cross_kv)
        return x + self.mlp(self.mlp_ln(x)), cache

    def with_cross_scores(self, x, mask, cross_kv):
        """One pass without a cache (word alignment): the output and the cross-attention scores."""
        x = x + self.attn(self.attn_ln(x), mask)[0]
        y, scores = self.cross_attn.with_scores(self.cross_attn_ln(x), cross_kv)
        x = x + y
        return x + self.mlp(self.mlp_ln(x)), scores


class AudioEncoder(nn.Module):
    dims: ModelDims
    dtype: Any = jnp.float32

    def setup(self):
        d = self.dims.n_audio_state
        self.conv1 = nn.Conv(d, (3,), padding=[(1, 1)], dtype=self.dtype, param_dtype=self.dtype)
        self.conv2 = nn.Conv(d, (3,), strides=(2,), padding=[(1, 1)], dtype=self.dtype, param_dtype=self.dtype)
        self.embed_positions = self.param(
            "embed_positions", nn.initializers.normal(0.02), (self.dims.n_audio_ctx, d), self.dtype
        )
        self.layers = [
            EncoderLayer(d, self.dims.n_audio_head, self.dtype, name=f"layers_{i}")
            for i in range(self.dims.n_audio_layer)
        ]
        self.ln_post = _layer_norm(self.dtype)

    def __call__(self, mel):
        """mel: [B, n_mels, frames] (any even number of frames up to 3000) -> [B, frames // 2, d]."""
        x = jnp.transpose(mel, (0, 2, 1)).astype(self.dtype)
        x = nn.gelu(self.conv1(x), approximate=False)
        x = nn.gelu(self.conv2(x), approximate=False)
        # A window shorter than 30 s uses the first rows of the (sinusoidal) position table.
        x = x + self.embed_positions[: x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    dims: ModelDims
    dtype: Any = jnp.float32

    def setup(self):
        d = self.dims.n_text_state
        self.embed_tokens = nn.Embed(self.dims.n_vocab, d, dtype=self.dtype, param_dtype=self.dtype)
        self.embed_positions = self.param(
            "embed_positions", nn.initializers.normal(0.02), (self.dims.n_text_ctx, d), self.dtype
        )
        self.layers = [
            DecoderLayer(d, self.dims.n_text_head, self.dtype, name=f"layers_{i}")
            for i in range(self.dims.n_text_layer)
        ]
        self.ln = _layer_norm(self.dtype)

    def cross_kv(self, audio_features) -> Cache:
        return tuple(layer.cross_kv(audio_features) for layer in self.layers)

    def __call__(self, tokens, index, start, cache: Cache, cross_kv: Cache):
        """Run ``tokens`` ([B, S]) written at cache slots ``index .. index+S-1``.

        ``start`` ([B]) is each row's first real slot (left padding before it is masked); a
        token's position in the sequence is its slot minus ``start``.  Returns the final hidden
        states [B, S, d] and the updated cache.
        """
        _, s = tokens.shape
        cache_len = cache[0][0].shape[2]
        slots = index + jnp.arange(s)  # [S]
        positions = jnp.clip(slots[None, :] - start[:, None], 0, self.dims.n_text_ctx - 1)
        x = self.embed_tokens(tokens) + self.embed_positions[positions]
        keys = jnp.arange(cache_len)
        mask = (keys[None, None, :] <= slots[None, :, None]) & (keys[None, None, :] >= start[:, None, None])
        new_cache = []
        for layer, layer_cache, layer_kv in zip(self.layers, cache, cross_kv):
            x, layer_cache = layer(x, mask, layer_cache, index, layer_kv)
            new_cache.append(layer_cache)
        return self.ln(x), tuple(new_cache)

    def alignment_pass(self, tokens, cross_kv: Cache, heads):
        """The whole of ``tokens`` ([B, S], from position 0, causal; padding after the real tokens
        changes nothing before it) in one pass, for word alignment.  Returns the final hidden states
        [B, S, d] and the cross-attention scores of ``heads`` ((layer, head) pairs), [B, len(heads),
        S, T]."""
        s = tokens.shape[1]
        x = self.embed_tokens(tokens) + self.embed_positions[:s]
        mask = jnp.tril(jnp.ones((s, s), bool))[None]
        picked = []
        for index, (layer, layer_kv) in enumerate(zip(self.layers, cross_kv)):
            x, scores = layer.with_cross_scores(x, mask, layer_kv)
            wanted = [head for layer_index, head in heads if layer_index == index]
            if wanted:
                picked.append(scores[:, jnp.asarray(wanted)])
        return self.ln(x), jnp.concatenate(picked, axis=1)

    def logits(self, hidden, projection=None):
        """Output projection, tied to the token embedding; float32 logits.

        ``projection`` is the embedding transposed (``[d, vocab]``), when the caller keeps one:
        reading it row-major is markedly faster on CPU, and a decoding step is bound by reading it.
        """
        if projection is None:
            projection = self.embed_tokens.embedding.T
        return jnp.dot(hidden, projection.astype(hidden.dtype)).astype(jnp.float32)


class Whisper(nn.Module):
    dims: ModelDims
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = AudioEncoder(self.dims, self.dtype)
        self.decoder = TextDecoder(self.dims, self.dtype)

    def encode(self, mel):
        return self.encoder(mel)

    def cross_kv(self, audio_features) -> Cache:
        return self.decoder.cross_kv(audio_features)

    def decode(self, tokens, index, start, cache: Cache, cross_kv: Cache):
        return self.decoder(tokens, index, start, cache, cross_kv)

    def logits(self, hidden, projection=None):
        return self.decoder.logits(hidden, projection)

    def alignment_pass(self, tokens, cross_kv: Cache, heads):
        return self.decoder.alignment_pass(tokens, cross_kv, heads)

    def __call__(self, mel, tokens):
        """Full forward pass (used to initialise parameters and to check shapes)."""
        batch = mel.shape[0]
        cross = self.cross_kv(self.encode(mel))
        cache = empty_cache(self.dims, batch, tokens.shape[1], self.dtype)
        hidden, _ = self.decode(tokens, 0, jnp.zeros((batch,), jnp.int32), cache, cross)
        return self.logits(hidden)


def empty_cache(dims: ModelDims, batch: int, length: int, dtype) -> Cache:
    shape = (batch, dims.n_text_head, length, dims.n_text_state // dims.n_text_head)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(dims.n_text_layer))


@functools.lru_cache(maxsize=8)
def param_shapes(dims: ModelDims, dtype=jnp.float32) -> dict:
    """The parameter tree a checkpoint must provide for ``dims`` (shapes only, nothing computed)."""
    model = Whisper(dims, dtype)
    mel = jax.ShapeDtypeStruct((1, dims.n_mels, 2 * dims.n_audio_ctx), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract: nothing is computed or compiled
    variables = jax.eval_shape(model.init, key, mel, tokens)
    return variables["params"]
