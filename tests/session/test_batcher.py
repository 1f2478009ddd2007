"""MicroBatcher: concurrent submissions become one transaction; gathering lengthens while busy."""

from __future__ import annotations

import asyncio

from services.session.servicer import MicroBatcher


async def test_gathering_is_short_when_idle_and_longer_while_busy() -> None:
    sizes: list[int] = []

    async def apply(items: list[str]) -> list[str]:
        sizes.append(len(items))
        return [item.upper() for item in items]

    batcher = MicroBatcher(apply, max_batch=100, concurrency=1, gather_turns=2, busy_gather_turns=6,
                           busy_batch=3)

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
    # Two calls together share one transaction; two are not "busy" (two workers would only wait).
    assert await phase(("c", 0), ("d", 0)) == [2]
    assert await phase(("e", 0), ("f", 4)) == [1, 1]
    # Three together make it busy...
    assert await phase(("g", 0), ("h", 0), ("i", 0)) == [3]
    # ...so it gathers longer: the late call joins.
    assert await phase(("j", 0), ("k", 4)) == [2]
    # A smaller batch makes it idle again.
    assert await phase(("l", 0), ("m", 4)) == [1, 1]
