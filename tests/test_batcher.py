"""The batcher gathers requests that arrive close together into one engine call."""

from __future__ import annotations

import asyncio

import pytest

from conftest import load_clip, load_refs

from jax_realtime.batcher import Batcher
from jax_realtime.engine import DecodeRequest


@pytest.mark.parametrize("gather_s, batches", [(0.0, 2), (1.0, 1)])
def test_requests_a_moment_apart_share_a_batch_only_when_gathered(tiny_engine, gather_s, batches):
    clips = [load_clip(r) for r in load_refs() if r["language"] == "en"][:3]

    async def main():
        batcher = Batcher(tiny_engine, gather_s=gather_s)
        loop = asyncio.create_task(batcher.run())
        first = asyncio.create_task(batcher.submit("a", DecodeRequest(clips[0])))
        await asyncio.sleep(0.05)  # the first is on the device by now unless the batcher waits
        rest = [batcher.submit(owner, DecodeRequest(c)) for owner, c in zip("bc", clips[1:])]
        results = await asyncio.gather(first, *rest)
        await batcher.close()
        loop.cancel()
        return results, batcher.stats

    results, stats = asyncio.run(main())
    assert all(r.text for r in results)
    assert (stats.batches, stats.requests) == (batches, 3)
