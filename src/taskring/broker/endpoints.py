"""Checks on the endpoint a broker binds, before libzmq sees it.

libzmq binds an ipc:// endpoint by deleting whatever socket file is at its
path first, a live one included: a second broker (on another log) would
take the endpoint over, and workers and clients that reconnect would find a
log whose task ids mean other tasks. A tcp:// port that is in use fails to
bind instead, as it should.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from taskring.errors import TaskringError


class EndpointInUse(TaskringError):
    """Another process serves the ipc endpoint this broker was to bind."""


def refuse_a_live_ipc_endpoint(endpoint: str) -> None:
    """Raise EndpointInUse unless this ipc:// path is free, or a dead broker's socket."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint.removeprefix("ipc://")
    if not path or path.startswith("@"):  # Linux's abstract names: bind itself refuses
        return
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(kind):
        # bind would delete it: a file of value, perhaps the task log itself
        raise EndpointInUse(f"{endpoint}: {path} exists and is not a socket")
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return  # left by a broker that died: bind replaces it
        except OSError as e:
            # A full backlog (a frozen broker), a timeout, no permission: not free.
            raise EndpointInUse(f"{endpoint} is in use or not ours to take: {e}") from None
    raise EndpointInUse(
        f"{endpoint} is in use by another process; give this broker another --endpoint"
    )
