"""Token buckets per (action, scope): bursts, refill, FIFO queueing, overrides, pruning."""

from __future__ import annotations

import pytest

from listener.ratelimit import PRUNE_THRESHOLD, Rate, RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock) -> RateLimiter:
    return RateLimiter(Rate(1.0, 3), {"get": Rate(5.0, 10)}, clock=clock)


def test_burst_is_free_then_callers_queue_one_interval_apart() -> None:
    rl = limiter(Clock())
    delays = [rl.reserve("start", "m1") for _ in range(6)]
    assert delays == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


def test_tokens_refill_at_the_rate_and_never_beyond_the_burst() -> None:
    clock = Clock()
    rl = limiter(clock)
    assert [rl.reserve("stop", "m1") for _ in range(3)] == [0.0, 0.0, 0.0]
    clock.now += 1.5
    assert rl.reserve("stop", "m1") == 0.0
    assert rl.reserve("stop", "m1") == pytest.approx(0.5)
    clock.now += 3600
    assert [rl.reserve("stop", "m1") for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


def test_actions_and_scopes_have_separate_buckets() -> None:
    rl = limiter(Clock())
    for _ in range(3):
        rl.reserve("start", "m1")
    assert rl.reserve("start", "m2") == 0.0
    assert rl.reserve("stop", "m1") == 0.0
    assert rl.reserve("start", "m1") == 1.0


def test_override_gives_an_action_its_own_rate() -> None:
    rl = limiter(Clock())
    delays = [rl.reserve("get", "m1") for _ in range(12)]
    assert delays[:10] == [0.0] * 10
    assert delays[10:] == [pytest.approx(0.2), pytest.approx(0.4)]


def test_a_clock_going_backwards_does_not_mint_tokens() -> None:
    bucket = TokenBucket(Rate(1.0, 1), tokens=1.0, updated=10.0)
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(5.0) == 1.0


def test_idle_full_buckets_are_pruned_but_queued_ones_kept() -> None:
    clock = Clock()
    rl = limiter(clock)
    for i in range(PRUNE_THRESHOLD - 1):
        rl.reserve("start", f"m{i}")
    for _ in range(5):  # in debt: 2 s of queue
        rl.reserve("start", "busy")
    assert len(rl) == PRUNE_THRESHOLD
    clock.now += 1.0  # the idle buckets are full again; "busy" still owes a token
    rl.reserve("start", "new")
    assert len(rl) == 2
    assert rl.reserve("start", "busy") == pytest.approx(2.0)


@pytest.mark.parametrize(("per_s", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_rate_rejects_nonsense(per_s: float, burst: int) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        Rate(per_s, burst)


def test_headroom_keeps_one_token_of_the_burst_or_paces_under_a_burst_of_one() -> None:
    assert Rate(1.0, 3).with_headroom() == Rate(1.0, 2)
    assert Rate(5.0, 10).with_headroom() == Rate(5.0, 9)
    assert Rate(1.0, 1).with_headroom() == Rate(0.98, 1)
