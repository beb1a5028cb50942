"""Under --dedup a duplicate row follows the request of the first row of its prompt and is
given that row's result when it comes: once, to exactly the rows that follow it."""

from __future__ import annotations

import numpy as np

from pipeline.followers import Followers


def test_each_leader_gives_its_own_followers_in_order_and_only_once() -> None:
    rng = np.random.default_rng(4)
    leaders = rng.integers(0, 2**64, size=50, dtype=np.uint64)
    expected: dict[int, list[int]] = {}
    pairs: list[tuple[int, int]] = []
    for follower in range(1000, 1300):  # 300 followers over 50 leaders, interleaved
        leader = int(leaders[rng.integers(50)])
        expected.setdefault(leader, []).append(follower)
        pairs.append((leader, follower))
    half = len(pairs) // 2  # given in two pieces (two models' rows)
    pieces = [pairs[:half], pairs[half:]]
    followers = Followers.of(
        [np.array([a for a, _ in p], dtype=np.uint64) for p in pieces],
        [np.array([b for _, b in p], dtype=np.uint64) for p in pieces],
    )

    assert len(followers) == 300
    for leader in rng.permutation(leaders).tolist():
        assert followers.pop(leader) == expected.get(leader, [])
        assert followers.pop(leader) == []  # (a leader's result is recorded once)
    assert followers.pop(12345) == []


def test_no_followers_answers_every_key_with_none() -> None:
    followers = Followers.of([], [])
    assert len(followers) == 0 and followers.pop(0) == [] and followers.pop(2**64 - 1) == []
