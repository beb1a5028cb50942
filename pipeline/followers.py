"""Which duplicate rows follow which request under ``--dedup``: a row whose prompt an
earlier row of the run has is not sent; it gets that row's result when it comes.

``Followers`` holds the pairs (the sent row's key, a follower's key) as sorted arrays:
8 bytes a follower and 17 a sent row that has any (a dict of lists took ~210 bytes a
follower, a million repeated rows 200 MB).
"""

from __future__ import annotations

import numpy as np


class Followers:
    """The followers' keys of each leader key (the row sent in their place); ``pop`` gives
    a leader's once."""

    def __init__(self, pairs: list[np.ndarray]) -> None:
        """From ``pairs``: the leaders' keys and the followers' keys, aligned, in any
        order (a leader's followers keep theirs); taken out of the list as they are sorted,
        so that the sort holds one copy more, not two."""
        order = np.argsort(pairs[0], kind="stable")
        self.keys = pairs.pop()[order]
        by_leader = pairs.pop()[order]
        del order
        new = np.ones(len(by_leader), dtype=bool)
        np.not_equal(by_leader[1:], by_leader[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        self.leaders = by_leader[starts]
        self.starts = np.append(starts, len(self.keys)).astype(np.int64)
        self.given = np.zeros(len(self.leaders), dtype=bool)

    @classmethod
    def of(cls, leaders: list[np.ndarray], followers: list[np.ndarray]) -> Followers:
        """From pieces of aligned pairs (taken out of the lists: not held twice)."""
        none = np.zeros(0, dtype=np.uint64)
        pairs = [
            np.concatenate([none, *part]) if len(part) != 1 else part[0]
            for part in (leaders, followers)
        ]
        leaders.clear()
        followers.clear()
        return cls(pairs)

    def __len__(self) -> int:
        """How many followers there are, given or not."""
        return len(self.keys)

    def pop(self, leader: int) -> list[int]:
        """The followers of ``leader``, the first time it is asked for (else none)."""
        if not len(self.leaders):
            return []
        at = int(np.searchsorted(self.leaders, np.uint64(leader)))
        if at == len(self.leaders) or int(self.leaders[at]) != leader or self.given[at]:
            return []
        self.given[at] = True
        return [int(k) for k in self.keys[self.starts[at] : self.starts[at + 1]]]
