"""The lease keeper against a real Redis: renewing what is seen, taking back what is unwanted,
and expiring nothing before it has looked for a whole lease."""

from __future__ import annotations

import uuid
from typing import Any

import redis
from docimport.session.v1 import session_service_pb2 as pb

from services.common.tasks import QUEUES
from services.session.leases import LeaseKeeper
from services.session.queue import CeleryEnqueuer, CeleryRunTracker, Sighting

from .conftest import open_harness
from .helpers import mfile, tune


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Switchable:
    """The real tracker, which a test can make fail (a broker that cannot be reached)."""

    def __init__(self, tracker: CeleryRunTracker) -> None:
        self.tracker, self.down = tracker, False

    async def sight(self) -> Sighting:
        if self.down:
            raise ConnectionError("the broker cannot be reached")
        return await self.tracker.sight()

    async def forget(self, task_ids: Any) -> None:
        await self.tracker.forget(task_ids)

    async def close(self) -> None:
        await self.tracker.close()


def queued_ids(redis_url: str) -> set[str]:
    import json

    client = redis.Redis.from_url(redis_url)
    try:
        return {
            json.loads(raw)["headers"]["id"]
            for queue in QUEUES.values()
            for raw in client.lrange(queue, 0, -1)
        }
    finally:
        client.close()


async def test_the_keeper_renews_what_it_sees_and_takes_back_what_is_unwanted(
    session_settings, pool, db_url, token_env, redis_url
):
    enqueuer = CeleryEnqueuer(redis_url)
    tracker = Switchable(CeleryRunTracker(redis_url, timeout=0.3))
    try:
        async with open_harness(
            session_settings, pool, db_url, token_env, enqueuer=enqueuer
        ) as h:
            tune(h, lease_ttl=600.0)
            clock = Clock()
            keeper = LeaseKeeper(h.store, tracker, h.settings, clock=clock)
            a = (await h.create([mfile(f"a{i}.pdf") for i in range(3)])).session
            b = (await h.create([mfile(f"b{i}.pdf") for i in range(2)])).session
            await h.dispatcher.run_once()  # published to Redis, nobody consumes
            async with h.pool.acquire() as conn:
                runs = await conn.fetch(
                    "SELECT task_id, session_id, lease_expires_at FROM session.stage_runs"
                )
            assert queued_ids(redis_url) == {r["task_id"] for r in runs}
            sighting = await keeper.look()
            assert sighting is not None and sighting.queued == {r["task_id"] for r in runs}
            assert keeper.renewed == 5
            async with h.pool.acquire() as conn:
                renewed = {
                    r["task_id"]: r["lease_expires_at"]
                    for r in await conn.fetch("SELECT task_id, lease_expires_at FROM session.stage_runs")
                }
            assert all(renewed[r["task_id"]] > r["lease_expires_at"] for r in runs)
            # runs no longer wanted (this harness's service has no tracker: its cancel takes
            # nothing back itself) leave the queues at the keeper's next look, revoked
            await h.operator.CancelSession(pb.CancelSessionRequest(session_id=b.session_id))
            left = {r["task_id"] for r in runs if str(r["session_id"]) == a.session_id}
            assert queued_ids(redis_url) == {r["task_id"] for r in runs}
            await keeper.look()
            assert queued_ids(redis_url) == left
    finally:
        await tracker.close()
        await enqueuer.close()


async def test_expiry_waits_until_the_keeper_has_seen_for_a_whole_lease(
    session_settings, pool, db_url, token_env, redis_url
):
    tracker = Switchable(CeleryRunTracker(redis_url, timeout=0.3))
    try:
        async with open_harness(session_settings, pool, db_url, token_env) as h:
            tune(h, lease_ttl=45.0, probe_interval=5.0)
            clock = Clock()
            keeper = LeaseKeeper(h.store, tracker, h.settings, clock=clock)
            assert not keeper.may_expire()  # never looked
            assert await keeper.look() is not None
            assert not keeper.may_expire()  # looked, not for a whole lease yet
            for _ in range(9):
                clock.now += 5.0
                await keeper.look()
            assert keeper.may_expire()  # 45 s of good looks
            tracker.down = True  # the broker (or Postgres) goes away
            clock.now += 5.0
            assert await keeper.look() is None
            assert not keeper.may_expire()
            tracker.down = False
            clock.now += 5.0
            await keeper.look()
            assert not keeper.may_expire()  # seeing again, since a moment only
            clock.now += 45.0
            await keeper.look()
            assert keeper.may_expire()
            clock.now += 60.0  # no look for a while (a stuck loop): no trust either
            assert not keeper.may_expire()
    finally:
        await tracker.close()


async def test_a_keeper_without_a_tracker_leaves_expiry_to_time(
    session_settings, pool, db_url, token_env
):
    async with open_harness(session_settings, pool, db_url, token_env) as h:
        keeper = LeaseKeeper(h.store, None, h.settings)
        assert keeper.may_expire() and await keeper.look() is None


def test_a_message_without_a_task_id_is_not_counted() -> None:
    from services.session.queue import _message_id

    assert _message_id(b'{"headers": {"id": "t-1"}}') == "t-1"
    assert _message_id(b'{"headers": {"root_id": "r", "parent_id": "p", "id": "t-2"}}') == "t-2"
    assert _message_id('{"headers":{"id":"t-3"}}') == "t-3"  # another layout: parsed
    assert _message_id(b"not json") is None
    assert _message_id(b'{"headers": {}}') is None
    assert _message_id(str(uuid.uuid4())) is None


async def test_a_broker_that_lost_its_data_ends_the_leases_of_the_queued_runs_it_held(
    session_settings, pool, db_url, token_env, redis_url
):
    """A flushed Redis: the queued runs nobody holds are lost now, not a lease later, so their
    in-flight slots are free for the documents waiting."""
    enqueuer = CeleryEnqueuer(redis_url)
    tracker = CeleryRunTracker(redis_url, timeout=0.3)
    try:
        async with open_harness(
            session_settings, pool, db_url, token_env, enqueuer=enqueuer
        ) as h:
            tune(h, lease_ttl=600.0)
            keeper = LeaseKeeper(h.store, tracker, h.settings)
            await h.create([mfile(f"{i}.pdf") for i in range(4)])
            await h.dispatcher.run_once()
            first = await keeper.look()
            assert first is not None and not first.broker_lost and len(first.queued) == 4
            async with h.pool.acquire() as conn:  # they were queued a while ago
                await conn.execute(
                    "UPDATE session.stage_runs SET queued_at = now() - interval '1 minute'"
                )
            again = await keeper.look()
            assert again is not None and not again.broker_lost  # nothing lost yet
            assert not keeper.may_expire()  # it has not been looking for a whole lease
            client = redis.Redis.from_url(redis_url)
            try:
                client.flushdb()
            finally:
                client.close()
            lost = await keeper.look()
            assert lost is not None and lost.broker_lost and not lost.queued
            async with h.pool.acquire() as conn:
                ended = await conn.fetchval(
                    "SELECT count(*) FROM session.stage_runs WHERE lease_expires_at <= now()"
                )
            assert ended == 4
            assert keeper.may_expire()  # the loss is the evidence: no whole lease to wait for
            assert not (await keeper.look()).broker_lost  # a new epoch, seen since
    finally:
        await tracker.close()
        await enqueuer.close()
