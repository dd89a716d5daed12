"""Consistent-hash ring with capacity-weighted virtual nodes and bounded-load assignment.

Why this shape:

* Stable hash. Keys and node points are hashed with BLAKE2b (8-byte digest), never
  Python's built-in hash function, which is salted per process for str and bytes.
  Every broker process, and every restart of one, must agree on which worker owns a key.
* Virtual nodes. One point per node splits the hash space very unevenly and moves a
  whole arc at once when membership changes. Many points per node ("vnodes") even out
  the shares, and placing ``vnodes * weight`` points makes a worker's share of keys
  proportional to its declared capacity.
* Bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016). Pure ownership ignores how busy
  a worker is; hot keys can pile onto one node. ``assign`` keeps the locality of the
  ring but spills a key clockwise to the next distinct node that has room, so no worker
  is handed more than its capacity while most keys still land on their owner.

The ring is pure data: no I/O, no clocks, no locks. Callers serialise access.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable

__all__ = ["DEFAULT_VNODES", "HashRing", "stable_hash"]

# A node's share with v points among 8v is Beta(v, 7v): at 320 the chance that any of 8
# equal nodes exceeds 1.3x its fair share is ~4e-7 per ring; at 160 it is ~6e-4, which a
# property test would eventually hit. More points cost memory for heavily weighted rings.
DEFAULT_VNODES = 320

_SPACE = 1 << 64


def stable_hash(key: str | bytes) -> int:
    """Map ``key`` to an int in [0, 2**64) identically in every process."""
    data = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring whose nodes own ``vnodes * weight`` points each."""

    def __init__(self, vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self._vnodes = vnodes
        self._weights: dict[str, int] = {}
        # Kept per node so remove() and the collision path never rehash.
        self._node_points: dict[str, list[int]] = {}
        # Sorted, distinct points plus a point -> node map. A parallel owners list would
        # have to be rebuilt in full on every change; the dict is updated incrementally.
        self._points: list[int] = []
        self._owner_at: dict[int, str] = {}
        # Points claimed by more than one node (a 64-bit collision: astronomically rare).
        self._contested: set[int] = set()

    @property
    def vnodes(self) -> int:
        return self._vnodes

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(sorted(self._weights))

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node: object) -> bool:
        return node in self._weights

    def weight(self, node: str) -> int:
        return self._weights[node]

    def add(self, node: str, weight: int = 1) -> None:
        # bool is an int subclass; True as a capacity is almost certainly a bug upstream.
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise ValueError(f"weight must be an int >= 1, got {weight!r}")
        if node in self._weights:
            raise ValueError(f"node already on the ring: {node!r}")
        points = sorted({stable_hash(f"{node}#{i}") for i in range(self._vnodes * weight)})
        self._weights[node] = weight
        self._node_points[node] = points
        if any(p in self._owner_at for p in points):
            self._rebuild()
            return
        self._owner_at.update(dict.fromkeys(points, node))
        # Timsort merges two sorted runs in linear time, so this is no full re-sort.
        self._points = sorted(self._points + points)

    def remove(self, node: str) -> None:
        if node not in self._weights:
            raise KeyError(node)
        del self._weights[node]
        points = self._node_points.pop(node)
        if self._contested.intersection(points):
            self._rebuild()
            return
        for p in points:
            del self._owner_at[p]
        self._points = [p for p in self._points if p in self._owner_at]

    def _rebuild(self) -> None:
        # Only reached on a point collision. Nodes are laid down in descending name order so
        # the smallest name wins a shared point: ownership must not depend on insertion order.
        self._owner_at = {}
        self._contested = set()
        for node in sorted(self._node_points, reverse=True):
            for p in self._node_points[node]:
                if p in self._owner_at:
                    self._contested.add(p)
                self._owner_at[p] = node
        self._points = sorted(self._owner_at)

    def _index(self, point: int) -> int:
        # First point at or after this one; past the last point wraps to index 0.
        i = bisect.bisect_left(self._points, point)
        return 0 if i == len(self._points) else i

    def owner(self, key: str | bytes) -> str | None:
        if not self._points:
            return None
        return self._owner_at[self._points[self._index(stable_hash(key))]]

    def assign(self, key: str | bytes, has_room: Callable[[str], bool]) -> str | None:
        """Return the first node clockwise from ``key``'s owner for which ``has_room`` holds.

        Each distinct node is asked at most once; ``None`` means every node is full.
        """
        return self.assign_point(stable_hash(key), has_room)

    def assign_point(self, point: int, has_room: Callable[[str], bool]) -> str | None:
        """``assign`` for a position on the ring (0 <= point < 2**64) instead of a key."""
        if not self._points:
            return None
        start = self._index(point)
        node = self._owner_at[self._points[start]]
        if has_room(node):  # the common case, without the walk's bookkeeping
            return node
        n_points = len(self._points)
        asked = {node}
        total = len(self._weights)
        if total == 1:
            return None
        for step in range(1, n_points):
            node = self._owner_at[self._points[(start + step) % n_points]]
            if node in asked:
                continue
            if has_room(node):
                return node
            asked.add(node)
            # Stop once everyone has said no rather than walking the remaining points.
            if len(asked) == total:
                break
        return None

    def shares(self) -> dict[str, float]:
        """Fraction of the 64-bit hash space each node owns (sums to 1.0 when non-empty)."""
        result = dict.fromkeys(self._weights, 0.0)
        if not self._points:
            return result
        # A point owns the arc from the previous point (exclusive) up to itself; the first
        # point also owns the wrap-around arc past the last point.
        prev = self._points[-1] - _SPACE
        for point in self._points:
            result[self._owner_at[point]] += (point - prev) / _SPACE
            prev = point
        return result
