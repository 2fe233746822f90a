"""The change hub on its own: who is woken by which announcement, the bound on waiters, and
that no announcement is lost between a check and a wait. Trio's MockClock stands in for time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from knox_server.changes import ChangeHub

WAIT = 10


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def test_a_full_hub_turns_subscriptions_away_until_one_closes() -> None:
    hub = ChangeHub(max_waiters=2)
    first = hub.subscribe(["a"])
    second = hub.subscribe(["b"])
    assert first is not None and second is not None
    assert hub.full and hub.waiting == 2
    assert hub.subscribe(["c"]) is None
    second.close()
    second.close()  # idempotent
    assert hub.waiting == 1
    third = hub.subscribe(["c"])
    assert third is not None
    with first, third:
        assert hub.waiting == 2
    assert hub.waiting == 0
    assert ChangeHub(max_waiters=0).subscribe(["a"]) is None
    with pytest.raises(ValueError, match="max_waiters"):
        ChangeHub(max_waiters=-1)


async def test_an_announcement_wakes_the_subscriptions_of_that_key_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = ChangeHub()
    results: dict[str, bool] = {}

    async def waiter(name: str, key_ids: list[str]) -> None:
        subscription = hub.subscribe(key_ids)
        assert subscription is not None
        with subscription:
            results[name] = await subscription.wait(trio.current_time() + 30)

    with trio.fail_after(WAIT * 10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, "on a", ["a"])
            nursery.start_soon(waiter, "on a and b", ["b", "a", "a"])
            nursery.start_soon(waiter, "on b", ["b"])
            nursery.start_soon(waiter, "on c", ["c"])
            await trio.testing.wait_all_tasks_blocked()
            assert hub.waiting == 4
            hub.notify("a")
            hub.notify("unwatched")
    assert results == {"on a": True, "on a and b": True, "on b": False, "on c": False}
    assert hub.waiting == 0


async def test_an_announcement_before_the_wait_is_not_lost_and_is_consumed_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = ChangeHub()
    subscription = hub.subscribe(["k"])
    assert subscription is not None
    with trio.fail_after(WAIT * 10), subscription:
        # Announced while the caller was still checking the store: the wait returns at once.
        hub.notify("k")
        hub.notify("k")
        start = trio.current_time()
        assert await subscription.wait(start + 30)
        assert trio.current_time() == start
        # Both announcements were consumed by that wait: the next one runs to its deadline.
        assert not await subscription.wait(start + 30)
        assert trio.current_time() == start + 30


async def test_notify_all_wakes_every_current_subscription_but_not_later_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = ChangeHub()
    early = [hub.subscribe([f"k{i}"]) for i in range(3)]
    hub.notify_all()
    late = hub.subscribe(["k0"])
    with trio.fail_after(WAIT * 10):
        deadline = trio.current_time() + 5
        for subscription in early:
            assert subscription is not None
            assert await subscription.wait(deadline)
            subscription.close()
        assert late is not None
        assert not await late.wait(deadline)
        late.close()
    assert hub.waiting == 0


async def test_a_cancelled_wait_leaves_the_subscription_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = ChangeHub()
    subscription = hub.subscribe(["k"])
    assert subscription is not None
    with trio.fail_after(WAIT * 10), subscription:
        with trio.move_on_after(1):
            await subscription.wait(trio.current_time() + 30)
        hub.notify("k")
        assert await subscription.wait(trio.current_time() + 30)


async def test_a_closed_subscription_hears_nothing_and_cannot_wait() -> None:
    hub = ChangeHub()
    subscription = hub.subscribe(["k"])
    assert subscription is not None
    subscription.close()
    assert subscription.closed
    hub.notify("k")
    hub.notify_all()
    with pytest.raises(RuntimeError, match="closed subscription"):
        await subscription.wait(trio.current_time())
    # Nothing is left behind for the key: a new subscriber starts clean.
    again = hub.subscribe(["k"])
    assert again is not None
    with again:
        assert not await again.wait(trio.current_time())


async def test_many_subscriptions_come_and_go_and_leave_no_trace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = ChangeHub(max_waiters=1000)
    woken = 0

    async def waiter(i: int) -> None:
        nonlocal woken
        subscription = hub.subscribe([f"k{i % 10}", "shared"])
        assert subscription is not None
        with subscription:
            if await subscription.wait(trio.current_time() + 60):
                woken += 1

    with trio.fail_after(WAIT * 10):
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
            assert hub.full
            hub.notify("shared")
    assert woken == 1000
    assert hub.waiting == 0
    assert not hub.full
