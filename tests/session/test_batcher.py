"""MicroBatcher: concurrent submissions become one transaction; gathering lengthens while busy."""

from __future__ import annotations

import asyncio

from services.session.servicer import MicroBatcher


async def test_gathering_is_short_when_idle_and_longer_while_busy() -> None:
    sizes: list[int] = []

    async def apply(items: list[str]) -> list[str]:
        sizes.append(len(items))
        return [item.upper() for item in items]

    batcher = MicroBatcher(apply, max_batch=100, concurrency=1, gather_turns=2, busy_gather_turns=6)

    async def late(item: str, turns: int) -> str:
        for _ in range(turns):
            await asyncio.sleep(0)
        return await batcher.submit(item)

    async def phase(*calls: tuple[str, int]) -> list[int]:
        sizes.clear()
        answers = await asyncio.gather(*(late(item, turns) for item, turns in calls))
        assert answers == [item.upper() for item, _ in calls]
        return list(sizes)

    # Idle: a call four loop turns after the first misses the first one's batch.
    assert await phase(("a", 0), ("b", 4)) == [1, 1]
    # Calls that arrive together share one transaction, and the batcher is now busy...
    assert await phase(("c", 0), ("d", 0)) == [2]
    # ...so it gathers longer: the late call joins.
    assert await phase(("e", 0), ("f", 4)) == [2]
    # A lone call makes it idle again.
    assert await phase(("g", 0)) == [1]
    assert await phase(("h", 0), ("i", 4)) == [1, 1]
