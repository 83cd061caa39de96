import asyncio

import pytest

from florence.serving.batching import MicroBatcher


def test_batcher_groups_concurrent_requests():
    sizes = []

    def double(items):
        sizes.append(len(items))
        return [2 * item for item in items]

    async def run():
        batcher = MicroBatcher("test", double, max_batch_size=8, max_wait_ms=50)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.stop()
        return results, batcher.stats

    results, stats = asyncio.run(run())

    assert results == [2 * i for i in range(20)]
    assert max(sizes) == 8
    assert stats.items == 20
    assert stats.batches < 20


def test_batcher_sends_error_to_every_request():
    def fail(items):
        raise RuntimeError("model failed")

    async def run():
        batcher = MicroBatcher("test", fail, max_wait_ms=20)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(run())

    assert all(isinstance(result, RuntimeError) for result in results)


def test_batcher_submit_before_start_raises():
    batcher = MicroBatcher("test", list)

    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(batcher.submit(1))
