"""Property tests for the consistent-hash ring (taskring.broker.hashring)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskring.broker import hashring
from taskring.broker.hashring import DEFAULT_VNODES, HashRing, stable_hash

# database=None: the example database would otherwise write a .hypothesis/ dir into the tree.
FAST = settings(deadline=None, database=None, max_examples=40)
SLOW = settings(deadline=None, database=None, max_examples=15)

KEYS = [f"task-{i}" for i in range(10_000)]
WORKERS = [f"worker-{i}" for i in range(8)]

node_names = st.text(min_size=1, max_size=16)
keys = st.one_of(st.text(max_size=24), st.binary(max_size=24))


def ring_of(
    names: list[str], weights: list[int] | None = None, vnodes: int = DEFAULT_VNODES
) -> HashRing:
    ring = HashRing(vnodes)
    for i, name in enumerate(names):
        ring.add(name, 1 if weights is None else weights[i])
    return ring


def owners(ring: HashRing, ks: list[str]) -> list[str | None]:
    return [ring.owner(k) for k in ks]


def recording(asked: list[str], room: Callable[[str], bool]) -> Callable[[str], bool]:
    """A has_room callback that logs every node it is asked about into ``asked``."""

    def has_room(node: str) -> bool:
        asked.append(node)
        return room(node)

    return has_room


# --- 1. stability ---------------------------------------------------------------------------


def test_stable_hash_is_blake2b_of_utf8_and_not_process_salted() -> None:
    # Given fixed inputs / When hashed / Then the values are pinned, so every process agrees.
    assert stable_hash("worker-0") == 1823768912059077650
    assert stable_hash(b"") == 16476032584258269876
    assert stable_hash("ключ") == 5536099946253895712
    assert stable_hash("ключ") == stable_hash("ключ".encode())
    expected = int.from_bytes(hashlib.blake2b(b"abc", digest_size=8).digest(), "big")
    assert stable_hash("abc") == expected


@FAST
@given(
    names=st.lists(node_names, min_size=1, max_size=8, unique=True),
    ks=st.lists(keys, min_size=1, max_size=40),
    data=st.data(),
)
def test_same_key_same_owner_regardless_of_insertion_order(
    names: list[str], ks: list[str], data: st.DataObject
) -> None:
    # Given a ring and an equal ring built in a different insertion order
    ring = ring_of(names, vnodes=16)
    shuffled = data.draw(st.permutations(names))
    other = ring_of(shuffled, vnodes=16)
    # When the same keys are looked up repeatedly
    first = owners(ring, ks)
    # Then owners never change and do not depend on insertion order
    assert owners(ring, ks) == first
    assert owners(other, ks) == first
    assert other.shares() == ring.shares()
    assert all(o in names for o in first)
    # And str keys and their UTF-8 bytes are the same key
    assert [ring.owner(k.encode() if isinstance(k, str) else k) for k in ks] == first


def test_point_collisions_resolve_independently_of_insertion_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a hash so coarse that virtual nodes of different workers collide constantly
    def coarse(key: str | bytes) -> int:
        return stable_hash(key) % 37

    monkeypatch.setattr(hashring, "stable_hash", coarse)
    names = ["a", "b", "c", "d"]
    ks = [f"k{i}" for i in range(200)]
    reference = ring_of(names, vnodes=8)
    # When the ring is built in every order, and built-then-shrunk versus built small
    for order in itertools.permutations(names):
        ring = ring_of(list(order), vnodes=8)
        # Then owners and shares are identical
        assert owners(ring, ks) == owners(reference, ks)
        assert ring.shares() == pytest.approx(reference.shares())
        ring.remove(order[0])
        small = ring_of([n for n in names if n != order[0]], vnodes=8)
        assert owners(ring, ks) == owners(small, ks)


def test_lookup_goes_clockwise_and_wraps_past_the_last_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given points placed by hand (the ring hashes point i of a node as f"{node}#{i}")
    table = {"a#0": 100, "b#0": 200, "below": 50, "between": 150, "on-b": 200, "above": 250}
    monkeypatch.setattr(hashring, "stable_hash", table.__getitem__)
    ring = HashRing(vnodes=1)
    ring.add("a")
    ring.add("b")
    # When keys on either side of, on, and past the last point are looked up
    found = {k: ring.owner(k) for k in ["below", "between", "on-b", "above"]}
    # Then each maps to the first point at or after it, wrapping to the start
    assert found == {"below": "a", "between": "b", "on-b": "b", "above": "a"}
    assert ring.assign("above", lambda n: n != "a") == "b"
    assert ring.shares() == {"a": (100 + 2**64 - 200) / 2**64, "b": 100 / 2**64}


# --- 2. minimal disruption ------------------------------------------------------------------


# The 1/N + 5% bound is statistical: a 2-node ring at 320 vnodes gives one node > 55% of the
# space about 0.6% of the time, so this test replays a fixed set of examples instead of
# drawing new ones (and flaking) on every run. The exact "only the affected node's keys
# move" assertions hold for every ring.
@settings(deadline=None, database=None, max_examples=25, derandomize=True)
@given(names=st.lists(node_names, min_size=2, max_size=12, unique=True), data=st.data())
def test_membership_change_moves_only_affected_keys(names: list[str], data: st.DataObject) -> None:
    n = len(names)
    bound = (1 / n + 0.05) * len(KEYS)
    victim = data.draw(st.sampled_from(names))
    # Given a ring of N nodes
    ring = ring_of(names)
    before = owners(ring, KEYS)

    # When one node is removed
    ring.remove(victim)
    removed = owners(ring, KEYS)
    # Then exactly the keys it owned move, and there are at most 1/N + 5% of them
    moved = [i for i, (a, b) in enumerate(zip(before, removed, strict=True)) if a != b]
    assert all(before[i] == victim for i in moved)
    assert len(moved) == before.count(victim)
    assert len(moved) <= bound

    # When it is added back
    ring.add(victim)
    added = owners(ring, KEYS)
    # Then only keys that now belong to it move, at most 1/N + 5%, restoring the old owners
    moved = [i for i, (a, b) in enumerate(zip(removed, added, strict=True)) if a != b]
    assert all(added[i] == victim for i in moved)
    assert len(moved) <= bound
    assert added == before


# --- 3. balance -----------------------------------------------------------------------------


@SLOW
@given(names=st.lists(node_names, min_size=8, max_size=8, unique=True))
@example(names=WORKERS)
def test_eight_nodes_stay_within_1_3x_fair_share(names: list[str]) -> None:
    # Given 8 equal nodes with the default virtual nodes
    ring = ring_of(names)
    fair = 1 / 8
    # When the hash space and 10,000 keys are divided among them
    shares = ring.shares()
    counts = {name: 0 for name in names}
    for owner in owners(ring, KEYS):
        assert owner is not None
        counts[owner] += 1
    # Then no node owns more than 1.3x its fair share of the space
    assert sum(shares.values()) == pytest.approx(1.0)
    assert max(shares.values()) <= 1.3 * fair
    # And key counts agree with the shares (0.02 is > 5 sampling standard deviations)
    for name in names:
        assert abs(counts[name] / len(KEYS) - shares[name]) <= 0.02
        assert counts[name] / len(KEYS) <= 1.3 * fair + 0.02


@SLOW
@given(names=st.lists(node_names, min_size=6, max_size=6, unique=True))
def test_weight_two_owns_about_twice_weight_one(names: list[str]) -> None:
    # Given three weight-1 and three weight-2 nodes (averaging over three keeps it stable)
    ring = ring_of(names, weights=[1, 1, 1, 2, 2, 2])
    # When shares are measured
    shares = ring.shares()
    light = sum(shares[n] for n in names[:3]) / 3
    heavy = sum(shares[n] for n in names[3:]) / 3
    # Then a weight-2 node owns roughly twice the space of a weight-1 node
    assert 1.5 <= heavy / light <= 2.5
    assert [ring.weight(n) for n in names] == [1, 1, 1, 2, 2, 2]


# --- 5. bounded loads -----------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("assign"), keys),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=10_000)),
    ),
    max_size=60,
)


@FAST
@given(
    nodes=st.dictionaries(
        node_names, st.integers(min_value=1, max_value=4), min_size=1, max_size=6
    ),
    ops=operations,
)
def test_bounded_loads_never_exceed_credit(
    nodes: dict[str, int], ops: list[tuple[str, int | str | bytes]]
) -> None:
    # Given workers whose credit is their weight, and a random stream of assigns and releases
    ring = HashRing(vnodes=32)
    for name, weight in nodes.items():
        ring.add(name, weight)
    load = dict.fromkeys(nodes, 0)
    held: list[str] = []
    for op, arg in ops:
        if op == "release":
            assert isinstance(arg, int)
            if held:
                load[held.pop(arg % len(held))] -= 1
            continue
        assert isinstance(arg, (str, bytes))
        asked: list[str] = []
        has_room = recording(asked, lambda n: load[n] < nodes[n])
        owner = ring.owner(arg)
        owner_had_room = owner is not None and load[owner] < nodes[owner]
        everyone_full = all(load[n] == nodes[n] for n in nodes)
        # When a task is assigned
        got = ring.assign(arg, has_room)
        # Then each node is asked at most once, starting with the owner
        assert len(asked) == len(set(asked))
        assert asked[0] == owner
        # And None means every node was full; otherwise the first node with room wins
        if got is None:
            assert everyone_full
            assert sorted(asked) == sorted(nodes)
            continue
        assert asked[-1] == got
        assert all(load[n] >= nodes[n] for n in asked[:-1])
        if owner_had_room:
            assert got == owner
        load[got] += 1
        held.append(got)
        # And no node ever holds more than its credit
        assert all(load[n] <= nodes[n] for n in nodes)


@FAST
@given(names=st.lists(node_names, min_size=2, max_size=6, unique=True), key=keys, data=st.data())
def test_assign_walks_the_same_clockwise_order(
    names: list[str], key: str, data: st.DataObject
) -> None:
    # Given the order in which assign visits nodes when nobody has room
    ring = ring_of(names, vnodes=8)
    order: list[str] = []
    assert ring.assign(key, recording(order, lambda n: False)) is None
    assert sorted(order) == sorted(names)
    # When only one node has room
    target = data.draw(st.sampled_from(names))
    asked: list[str] = []
    got = ring.assign(key, recording(asked, lambda n: n == target))
    # Then assign returns it after asking exactly the nodes before it in that order
    assert got == target
    assert asked == order[: order.index(target) + 1]


# --- 6. edge cases --------------------------------------------------------------------------


def test_empty_ring_owns_nothing() -> None:
    # Given an empty ring / When queried / Then there is no owner and has_room is not called
    ring = HashRing()
    assert ring.owner("k") is None
    assert ring.assign("k", lambda n: pytest.fail("has_room called on empty ring")) is None
    assert ring.shares() == {}
    assert len(ring) == 0
    assert ring.nodes == ()


def test_ring_empties_after_last_remove() -> None:
    # Given a one-node ring / When it is removed / Then the ring behaves as empty again
    ring = HashRing(vnodes=4)
    ring.add("w", 3)
    assert ring.owner("k") == "w"
    assert ring.shares() == {"w": pytest.approx(1.0)}
    assert "w" in ring and len(ring) == 1 and ring.nodes == ("w",) and ring.weight("w") == 3
    ring.remove("w")
    assert ring.owner("k") is None
    assert "w" not in ring


@pytest.mark.parametrize("weight", [0, -1, True, 1.5, "2"])
def test_bad_weight_is_rejected(weight: object) -> None:
    # Given a ring / When a node is added with a bad weight / Then ValueError, ring unchanged
    ring = HashRing(vnodes=4)
    with pytest.raises(ValueError):
        ring.add("w", weight)  # type: ignore[arg-type]
    assert "w" not in ring
    assert ring.owner("k") is None


def test_duplicate_node_and_bad_vnodes_are_rejected() -> None:
    # Given a ring holding "w" / When "w" is added again / Then ValueError, weight unchanged
    ring = HashRing(vnodes=4)
    ring.add("w", 2)
    with pytest.raises(ValueError):
        ring.add("w", 5)
    assert ring.weight("w") == 2
    with pytest.raises(ValueError):
        HashRing(vnodes=0)


def test_removing_unknown_node_raises_key_error() -> None:
    # Given a ring without "ghost" / When it is removed / Then KeyError and nothing changes
    ring = HashRing(vnodes=4)
    ring.add("w")
    with pytest.raises(KeyError):
        ring.remove("ghost")
    assert ring.nodes == ("w",)
