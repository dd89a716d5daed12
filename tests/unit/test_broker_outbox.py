"""The order a broker turn's messages leave in."""

from __future__ import annotations

from taskring import protocol as p
from taskring.broker.server import waiting_path_first


def message(peer: bytes, command: bytes, n: int) -> list[bytes]:
    protocol = p.PROTOCOL_WORKER if peer.startswith(b"w") else p.PROTOCOL_CLIENT
    return [peer, protocol, command, bytes([n])]


def test_the_peers_given_work_or_news_go_first_each_in_its_own_order() -> None:
    outbox = [
        message(b"c1", p.REPLY, 1),
        message(b"w1", p.ACK, 2),
        message(b"c2", p.REPLY, 3),
        message(b"w1", p.TASK, 4),
        message(b"c1", p.NOTIFY, 5),
        message(b"w2", p.HEARTBEAT, 6),
    ]
    sent = waiting_path_first(outbox)
    assert [m[3][0] for m in sent] == [1, 2, 4, 5, 3, 6]
    assert sorted(map(bytes, (m[3] for m in sent))) == sorted(m[3] for m in outbox)


def test_a_turn_with_nothing_on_a_waiting_path_keeps_its_order() -> None:
    outbox = [message(b"c1", p.REPLY, 1), message(b"w1", p.ACK, 2), message(b"c1", p.REPLY, 3)]
    assert waiting_path_first(outbox) == outbox


def test_a_submit_turn_sends_the_task_before_the_reply() -> None:
    outbox = [message(b"c1", p.REPLY, 1), message(b"w1", p.TASK, 2)]
    assert [m[2] for m in waiting_path_first(outbox)] == [p.TASK, p.REPLY]
