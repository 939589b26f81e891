"""``flower-supernode`` with one repair: a reply never waits for the next pull.

Flower 1.41's SuperNode loop pushes replies only right after it pulls a message (one push stage per
pull). After a coordinator crash, a site can still hold a message of the dead run: its receipt is
refused with ``RunNotRunningException``, a ``BaseException`` that skips the cleanup, so the message
stays and its ClientApp runs. Its reply then fills the push stage of the next pulled message (the
resumed run's), and that message's reply waits for a pull that never comes: the resumed run hangs
(seen once in ``tests/test_deploy.py``'s coordinator-crash test: 400 s, then a timeout). With the
repair, a loop turn that pulls nothing still pushes a reply that is waiting; the dead run's reply
is refused by the SuperLink as before, and the live one goes out.

``fedpeft site`` runs this module in place of the ``flower-supernode`` command (same arguments).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def reply_waiting(state: Any) -> int | None:
    """The run of a stored reply not yet taken for sending, without taking it (Flower's
    ``get_messages_legacy`` marks what it returns as retrieved); None when there is none."""
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if store is None or lock is None:  # not the in-memory NodeState this was written against
        return None
    with lock:
        for entry in store.values():
            meta = entry.message.metadata
            if meta.reply_to_message_id and not entry.is_retrieved:
                return int(meta.run_id)
    return None


def flushing(pull: Callable[..., int | None]) -> Callable[..., int | None]:
    """Flower's pull step, reporting a waiting reply's run when nothing was pulled, so the loop
    runs its push stage now instead of after the next pull."""

    def pull_or_flush(**kwargs: Any) -> int | None:  # the loop passes everything by keyword
        run_id = pull(**kwargs)
        return reply_waiting(kwargs["state"]) if run_id is None else run_id

    return pull_or_flush


def install() -> None:
    """Patch the SuperNode loop of this process (Flower looks the pull step up by name each turn)."""
    # Hand-written: Flower 1.41 has no hook into its SuperNode loop, and the hang is in that loop.
    import flwr.supernode.start_client_internal as loop

    if not getattr(loop._pull_and_store_message, "fedpeft_flushing", False):
        patched = flushing(loop._pull_and_store_message)
        patched.fedpeft_flushing = True  # type: ignore[attr-defined]
        loop._pull_and_store_message = patched


def main() -> None:
    install()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
