"""knoxd.upstream.refresher: the pure decisions (no I/O), then the trio shell on a mock clock.

The state machine is driven with explicit times. The shell test runs a real :class:`Refresher`
with a real identity (certificates from ``tests.pki``), a real cache file, and an upstream address
nothing listens on, under ``trio.testing.MockClock`` so that minutes of backoff take milliseconds.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from knox import wire
from knox.errors import (
    InternalError,
    KeyNotFoundError,
    KnoxError,
    UnauthenticatedError,
    UnauthorizedError,
)
from knox.http_client import UpstreamHTTPError, UpstreamUnavailable
from knox.model import Key, KeyVersion, VersionStatus, version_hash
from knoxd.cache.cache_key import load_cache_key
from knoxd.cache.entry import CacheEntry
from knoxd.cache.store import CacheStore
from knoxd.cache.view import CacheView
from knoxd.config import IdentityConfig, IdentityKind, PeerSelectors, UpstreamConfig
from knoxd.fetch import Refusal
from knoxd.upstream.identity import Identity
from knoxd.upstream.refresher import (
    Check,
    Fetch,
    Refresher,
    RefreshSettings,
    RefreshState,
    Verdict,
    Wait,
    full_jitter_backoff,
    judge,
)
from tests.pki import CA

H = "a" * 64
H2 = "b" * 64
SETTINGS = RefreshSettings(
    refresh_seconds=60,
    revalidate_seconds=600,
    jitter=0.1,
    backoff_min_seconds=1,
    backoff_max_seconds=300,
    refusal_ttl_seconds=30,
)


def state(
    registered: list[str],
    hashes: dict[str, str] | None = None,
    settings: RefreshSettings = SETTINGS,
    now: float = 0.0,
) -> RefreshState:
    return RefreshState(
        settings, now=now, registered=registered, hashes=hashes, rng=random.Random(7)
    )


def drain(s: RefreshState, now: float, hashes: dict[str, str] | None = None) -> list[str]:
    """Perform every pending fetch successfully; returns what was fetched, in order."""
    done: list[str] = []
    while isinstance(step := s.next_step(now), Fetch):
        for key_id in step.key_ids:
            s.fetched(key_id, (hashes or {}).get(key_id, H))
            done.append(key_id)
    return done


# --- the state machine -----------------------------------------------------------------------


def test_uncached_keys_are_fetched_first_then_the_cached_ones_are_checked() -> None:
    s = state(["a", "b", "c"], {"a": H})
    assert s.next_step(0) == Fetch(("b", "c"))
    s.fetched("b", H)
    s.fetched("c", H2)
    step = s.next_step(0)
    assert isinstance(step, Check)
    assert step.hashes == {"a": H, "b": H, "c": H2}
    # A long-poll window of the refresh interval, shortened by up to the jitter (10 %).
    assert step.wait is not None and 54 <= step.wait <= 60
    assert step.until == s.revalidate_at


def test_changed_keys_are_fetched_and_the_next_check_waits_one_interval() -> None:
    s = state(["a", "b"], {"a": H, "b": H})
    assert isinstance(s.next_step(0), Check)
    s.checked(["b", "unknown"], 0.5)
    s.succeeded()
    assert s.next_step(0.5) == Fetch(("b",))
    s.fetched("b", H2)
    step = s.next_step(0.6)
    assert isinstance(step, Wait)
    # Jitter only ever shortens the interval, by at most 10 %.
    assert 0.5 + 54 <= step.until <= 0.5 + 60
    assert isinstance(s.next_step(step.until), Check)


def test_a_long_poll_server_is_asked_again_at_once() -> None:
    s = state(["a"], {"a": H})
    # Held for 29 s: the next check goes at once.
    s.checked([], 30.0, held_since=1.0)
    assert s.check_at == 30.0
    # Answered soon (a version added, then promoted): the next check still goes at once.
    s.checked(["a"], 30.2, held_since=30.0)
    assert s.check_at == 30.2
    assert drain(s, 30.2, {"a": H2}) == ["a"]
    # A third answer within a second of the check before: it waits for that second to pass,
    # so a server that claims to hold and answers at once gets two checks a second at most.
    s.checked([], 30.3, held_since=30.2)
    assert s.check_at == 31.0
    s.checked([], 31.05, held_since=31.0)
    assert s.check_at == 31.2
    assert isinstance(s.next_step(31.2), Check)
    # A check the server did not hold: polling, one interval (jittered) later.
    s.checked([], 32.0)
    assert 32.0 + 54 <= s.check_at <= 32.0 + 60
    s.checked([], 90.0, held_since=89.0)
    assert s.check_at == 90.0


def test_long_poll_windows_differ_from_host_to_host() -> None:
    """Hosts whose long-polls started together (a server restart) end them apart."""
    waits: set[int] = set()
    for seed in range(40):
        s = RefreshState(
            SETTINGS, now=0, registered=["a"], hashes={"a": H}, rng=random.Random(seed)
        )
        step = s.next_step(0)
        assert isinstance(step, Check) and step.wait is not None
        waits.add(step.wait)
    assert len(waits) > 3
    assert min(waits) >= 54 and max(waits) <= 60
    # Short windows spread too: 9 or 10 s for a 10 s interval, never more.
    short = RefreshSettings(refresh_seconds=10, jitter=0.1)
    tens = {
        step.wait
        for seed in range(40)
        if isinstance(
            step := RefreshState(
                short, now=0, registered=["a"], hashes={"a": H}, rng=random.Random(seed)
            ).next_step(0),
            Check,
        )
    }
    assert tens == {9, 10}


def test_no_check_and_no_request_without_cached_keys() -> None:
    s = state([])
    step = s.next_step(0)
    assert isinstance(step, Wait)
    assert step.until > 50


def test_revalidation_fetches_every_registered_key_once_per_interval() -> None:
    s = state(["b", "a"], {"a": H, "b": H})
    first = s.revalidate_at
    assert 540 <= first <= 600
    assert isinstance(s.next_step(first - 1), Check)
    s.checked([], first - 1)
    assert s.next_step(first) == Fetch(("a", "b"))
    assert s.revalidate_at >= first + 540
    assert drain(s, first) == ["a", "b"]
    assert isinstance(s.next_step(first), Wait)


def test_registrations_and_requests_go_before_the_revalidation_sweep() -> None:
    settings = RefreshSettings(revalidate_seconds=10, refresh_seconds=5, fetch_batch=2)
    s = state(["a", "b", "c"], {"a": H, "b": H, "c": H}, settings)
    t = s.revalidate_at
    assert s.next_step(t) == Fetch(("a", "b"))
    s.register(["z"], t)
    assert s.request(["c", "not-registered"]) == 1
    assert s.next_step(t) == Fetch(("z", "c"))
    s.fetched("z", H)
    s.fetched("c", H)
    # c was fetched ahead of the sweep, which then has only a and b left.
    assert s.next_step(t) == Fetch(("a", "b"))
    assert s.queued == 2


def test_backoff_is_full_jitter_doubling_up_to_the_cap() -> None:
    rng = random.Random(1)
    settings = RefreshSettings(backoff_min_seconds=1, backoff_max_seconds=20)
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 20), (500, 20)]:
        delays = [full_jitter_backoff(failures, settings, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter: the whole range is used, not just the top of it.
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9


def test_a_failure_blocks_every_step_until_the_backoff_ends() -> None:
    s = state(["a", "b"], {"a": H})
    delay = s.failed(10.0, "upstream: down")
    assert s.next_step(10.0) == Wait(10.0 + delay)
    assert s.failures == 1
    assert s.last_error == "upstream: down"
    # What was queued is still queued after the backoff.
    assert s.next_step(10.0 + delay) == Fetch(("b",))
    s.fetched("b", H)
    s.succeeded()
    assert s.failures == 0
    assert s.retry_at is None
    assert s.refusal("b", 20.0) is None


def test_a_failing_upstream_makes_uncached_keys_unreachable() -> None:
    s = state(["cached", "pending"], {"cached": H})
    assert s.refusal("pending", 0) is None
    s.failed(0, "upstream: down")
    assert s.refusal("pending", 0) is Refusal.UNREACHABLE
    assert s.refusal("cached", 0) is None
    assert s.refusal("unregistered", 0) is None


def test_refusals_are_remembered_for_the_ttl_and_then_asked_again() -> None:
    s = state(["k"], {"k": H})
    assert s.refused("k", Refusal.FORBIDDEN, 100.0) is True
    assert "k" not in s.hashes
    assert s.refusal("k", 129.0) is Refusal.FORBIDDEN
    # The same answer again (the next revalidation) is not news; another one is.
    assert s.refused("k", Refusal.FORBIDDEN, 110.0) is False
    assert s.refused("k", Refusal.NOT_FOUND, 111.0) is True
    # Registering again within the TTL causes no request...
    s.register(["k"], 120.0)
    assert not isinstance(s.next_step(120.0), Fetch)
    # ...after it, the key is asked for again.
    assert s.refusal("k", 141.0) is None
    s.register(["k"], 141.0)
    assert s.next_step(141.0) == Fetch(("k",))
    # Whoever registered it again waits for this answer: it is news.
    assert s.refused("k", Refusal.NOT_FOUND, 142.0) is True
    s.register(["k"], 200.0)
    s.fetched("k", H2)
    assert s.refusal("k", 200.0) is None
    assert s.hashes["k"] == H2


def test_an_unusable_answer_for_an_uncached_key_is_retried_with_the_next_check() -> None:
    s = state(["new", "old"], {"old": H})
    assert s.next_step(0) == Fetch(("new",))
    s.unanswered("new")
    assert s.refusal("new", 0) is Refusal.UNREACHABLE
    step = s.next_step(0)
    assert isinstance(step, Check)
    assert "new" not in step.hashes
    s.checked([], 1)
    assert s.next_step(1) == Fetch(("new",))


def test_unregistered_keys_are_forgotten_and_late_answers_ignored() -> None:
    s = state(["a", "b"], {"a": H})
    assert s.unregister(["a", "b", "zzz"]) == ["a", "b"]
    s.fetched("b", H)
    assert s.hashes == {}
    assert not s.is_registered("b")
    assert isinstance(s.next_step(0), Wait)
    assert s.request(None) == 0


def test_register_reports_only_new_keys() -> None:
    s = state(["a"], {"a": H})
    assert s.register(["a", "b", "c"], 0) == ["b", "c"]
    assert s.next_step(0) == Fetch(("b", "c"))


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (KeyNotFoundError("No such key k"), Verdict.DELETED),
        (UnauthorizedError("Principal x not authorized to read k"), Verdict.FORBIDDEN),
        (wire.WireError("invalid key content"), Verdict.BAD_ANSWER),
        (UpstreamUnavailable("no Knox server answered"), Verdict.UPSTREAM_DOWN),
        (UpstreamHTTPError("HTTP 502", 502), Verdict.UPSTREAM_DOWN),
        (InternalError("database down"), Verdict.UPSTREAM_DOWN),
        (UnauthenticatedError("bad cert"), Verdict.UPSTREAM_DOWN),
    ],
)
def test_judge(error: KnoxError, verdict: Verdict) -> None:
    assert judge(error) is verdict


def test_long_poll_wait_is_whole_seconds_of_the_refresh_interval() -> None:
    assert RefreshSettings(refresh_seconds=60).long_poll_wait == 60
    assert RefreshSettings(refresh_seconds=2.7).long_poll_wait == 2
    assert RefreshSettings(refresh_seconds=0.5).long_poll_wait is None


# --- the shell, on a mock clock --------------------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"https://127.0.0.1:{port}"


def cached_key(key_id: str) -> Key:
    versions = (KeyVersion(11, b"cached-secret", VersionStatus.PRIMARY, 1),)
    return Key(key_id, (), versions, version_hash(versions))


async def test_a_down_upstream_is_retried_with_backoff_and_the_cache_keeps_serving(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    ca = CA.create()
    cert, key = ca.machine_cert("web-1.example.com").write(tmp_path, "host")
    upstream = UpstreamConfig(
        urls=(closed_port_url(),), ca=ca.write_cert(tmp_path / "ca.pem"), timeout_seconds=2
    )
    identity_config = IdentityConfig(
        "host", IdentityKind.MACHINE, cert, key, peers=PeerSelectors(uid=(0,))
    )
    settings = RefreshSettings(
        refresh_seconds=5, revalidate_seconds=60, backoff_min_seconds=1, backoff_max_seconds=8
    )
    identity = Identity.load(identity_config, upstream)
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    view = CacheView()
    async with await CacheStore.open(state_dir, load_cache_key(state_dir, {})) as store:
        entry = CacheEntry("host", cached_key("db:pw"), cached_key("db:pw").hash, 1000.0)
        await store.put(entry)
        view.set(entry)
        refresher = Refresher(
            identity,
            RefreshState(
                settings,
                now=trio.current_time(),
                registered=["db:pw", "never:fetched"],
                hashes={"db:pw": entry.hash},
                rng=random.Random(3),
            ),
            store=store,
            view=view,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresher.run)
            await trio.sleep(120)
            nursery.cancel_scope.cancel()
        await identity.aclose()
    served = view.get("host", "db:pw")
    assert served is not None
    assert served.key.primary.data == b"cached-secret"
    assert served.fetched_at == 1000.0
    assert served.last_error is not None
    assert served.last_error.startswith("upstream: no Knox server answered")
    assert refresher.state.refusal("never:fetched", trio.current_time()) is Refusal.UNREACHABLE
    # Two virtual minutes with backoff capped at 8 s: it kept trying, but never in a tight loop.
    assert 8 <= refresher.state.failures <= 120
    assert refresher.last_refresh_at is None
