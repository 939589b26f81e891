"""Flower's Simulation Engine at 100,000 virtual nodes: its message pump made O(messages).

Flower 1.41's ``vce_api.add_messages_to_queue`` asks the LinkState for every registered node's
next message every 0.1 s. Each ask takes the state's lock and checks every message in flight,
so one sweep costs nodes x in-flight messages (100,000 x 20: seconds per sweep, a round's
dispatch waits behind it). ``fedpeft simulate`` swaps in ``add_pending_messages_to_queue``,
which asks only the nodes that have an undelivered message, in the same (partition) order, and
falls back to Flower's own sweep on a LinkState it does not know. Being cheap, it sweeps every
20 ms instead of 0.1 s, so a short message (a secure-aggregation stage) waits less.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from queue import Queue
from typing import Any

log = logging.getLogger(__name__)


def pending_nodes(state: Any) -> list[int] | None:
    """Destination node ids of the undelivered messages in an in-memory LinkState; None when
    ``state`` does not keep them where Flower 1.41's ``InMemoryLinkState`` does."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        return list({m.metadata.dst_node_id for m in store.values() if m.metadata.delivered_at == ""})


def add_pending_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int],
                                  f_stop: threading.Event) -> None:
    """Flower's ``add_messages_to_queue`` (same arguments, same order of messages: by partition
    id), asking only nodes that have a message waiting."""
    while not f_stop.is_set():
        nodes = pending_nodes(state)
        known = nodes is not None
        if nodes is None:
            nodes = list(nodes_mapping)
        else:
            nodes = sorted((n for n in nodes if n in nodes_mapping), key=nodes_mapping.__getitem__)
        for node_id in nodes:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        f_stop.wait(0.02 if known else 0.1)  # a sweep of pending nodes costs microseconds: poll every 20 ms


@contextlib.contextmanager
def fast_message_pump() -> Iterator[None]:
    """Within the block, Flower's Simulation Engine uses ``add_pending_messages_to_queue``."""
    from flwr.server.superlink.fleet.vce import vce_api

    original: Callable[..., None] | None = getattr(vce_api, "add_messages_to_queue", None)
    if original is None:  # another Flower layout: leave it as it is
        log.warning("flwr's vce_api has no add_messages_to_queue: the simulation keeps Flower's own pump")
        yield
        return
    vce_api.add_messages_to_queue = add_pending_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original
