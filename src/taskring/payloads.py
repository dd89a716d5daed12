"""Task arguments on their way out: packed once, checked as the far side will check them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgpack

from taskring import protocol

_LIMITS = protocol.DEFAULT_LIMITS


def check_payload(name: str, index: int, payload: bytes) -> None:
    """Refuse what the broker or a worker would: oversize, or not decodable there.

    Workers decode with strict map keys (str or bytes only), so a dict with
    int keys packs here but would fail every attempt there.
    """
    if len(payload) > _LIMITS.max_payload_bytes:
        raise ValueError(
            f"arguments #{index} of task {name!r} take {len(payload)} bytes packed; "
            f"the limit is {_LIMITS.max_payload_bytes}"
        )
    try:
        msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError) as e:
        raise TypeError(f"arguments #{index} of task {name!r} cannot be sent: {e}") from e


def payload(name: str, index: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
    try:
        payload = protocol.pack([args, kwargs])
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"arguments #{index} of task {name!r} cannot be sent: {e}") from e
    check_payload(name, index, payload)
    return payload


def encode_many(
    name: str,
    arglist: Iterable[Sequence[Any]],
    key: Callable[[Sequence[Any]], str | None] | None,
) -> list[dict[str, Any]]:
    """One wire item per argument sequence, packed in a tight loop (one dict each)."""
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    no_kwargs: dict[str, Any] = {}
    items: list[dict[str, Any]] = []
    append = items.append
    for index, args in enumerate(arglist):
        if type(args) is not tuple and type(args) is not list:
            if isinstance(args, str | bytes) or not isinstance(args, Sequence):
                raise TypeError(
                    f"arguments #{index} of task {name!r} must be a sequence, "
                    f"not {type(args).__name__}"
                )
            args = list(args)
        try:
            payload = pack([args, no_kwargs])
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"arguments #{index} of task {name!r} cannot be sent: {e}") from e
        check_payload(name, index, payload)
        if key is None:
            append({"name": name, "payload": payload})
        else:
            append({"name": name, "payload": payload, "key": key(args)})
    return items
