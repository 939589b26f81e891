"""``fedpeft.deploy.supernode``: the SuperNode loop's repair, on Flower's own NodeState and push stage."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
from flwr.supernode.start_client_internal import _insert_message, _push_messages

from fedpeft.deploy.supernode import flushing, install, reply_waiting

DEAD_RUN, RESUMED_RUN = 11, 22


def _reply(run_id: int, reply_to: str) -> Message:
    md = Metadata(run_id=run_id, message_id="", src_node_id=2, dst_node_id=1, reply_to_message_id=reply_to,
                  group_id="2", created_at=time.time(), ttl=3600, message_type="train")
    return Message(metadata=md, content=RecordDict({"m": ConfigRecord({"run": run_id})}))


def _turn(pull, state, store) -> list[int]:
    """One turn of Flower's SuperNode loop (``start_client_internal``): pull, then the push stage only
    when the pull returned a run; the runs of the replies it sent."""
    sent: list[int] = []

    def send(message: Message, tree, runtime: float) -> tuple[set[str], str]:
        sent.append(message.metadata.run_id)
        return set(), "session"  # the SuperLink already holds every object: nothing more to push

    if pull(state=state, object_store=store) is not None:
        _push_messages(state=state, object_store=store, send=send, push_object=lambda *a: None)
    return sent


def test_a_reply_that_missed_its_push_stage_goes_out_on_the_next_turn():
    """The hang seen once in test_deploy's coordinator-crash test, replayed: the dead run's reply took
    the push stage of the resumed run's message, the resumed run's reply came after, and the SuperLink
    has nothing new (its ServerApp waits for that reply). Flower's loop never sends it; with the
    repair the next turn does, once."""
    # Prepare
    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    _insert_message(_reply(RESUMED_RUN, "b" * 64), state, store)
    nothing_new = lambda **kw: None  # noqa: E731  # the SuperLink's answer to this node's pull
    # Execute
    plain = [_turn(nothing_new, state, store) for _ in range(3)]
    waiting = reply_waiting(state)
    repaired = [_turn(flushing(nothing_new), state, store) for _ in range(2)]
    # Assert
    assert plain == [[], [], []] and waiting == RESUMED_RUN  # Flower alone: stuck; looking did not take it
    assert repaired == [[RESUMED_RUN], []]  # sent on the first repaired turn, and only once
    assert reply_waiting(state) is None


def test_the_repair_leaves_a_pulled_run_and_an_empty_node_alone():
    # Prepare
    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)
    # Execute / Assert: a pull that got a message is Flower's as before; nothing waiting stays None
    assert flushing(lambda **kw: DEAD_RUN)(state=state, object_store=store) == DEAD_RUN
    assert flushing(lambda **kw: None)(state=state, object_store=store) is None


def test_install_patches_the_loop_that_flower_supernode_runs_once():
    import flwr.supernode.start_client_internal as loop

    # Prepare
    original = loop._pull_and_store_message
    try:
        # Execute
        install()
        install()
        # Assert: the loop's pull step is the repaired one, wrapped once
        assert loop._pull_and_store_message is not original
        assert getattr(loop._pull_and_store_message, "fedpeft_flushing", False)
        assert loop._pull_and_store_message.__closure__[0].cell_contents is original
    finally:
        loop._pull_and_store_message = original
