"""Each event logged once: fedpeft's lines through its own handler only, Flower's chatter folded
away unless --verbose (the banner and config dumps it would print are in metrics.json)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def root_records():
    """What reaches a root handler (as Ray's and Flower's would print it a second time)."""
    seen: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    h = Catch()
    logging.getLogger().addHandler(h)
    yield seen
    logging.getLogger().removeHandler(h)


@pytest.mark.parametrize("verbose", [False, True])
def test_each_event_is_logged_once_and_flower_is_quiet_unless_verbose(root_records, verbose, monkeypatch):
    from fedpeft.cli import configure_logging

    monkeypatch.delenv("FEDPEFT_VERBOSE", raising=False)
    flwr_seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            flwr_seen.append(record.getMessage())

    flwr_log = logging.getLogger("flwr")
    h = Catch()
    flwr_log.addHandler(h)
    try:
        # Execute
        configure_logging(verbose=verbose)
        flwr_log.setLevel(logging.INFO)  # what Flower does when a simulation starts
        logging.getLogger("fedpeft.server").info("round 1: global accuracy 0.5")
        flwr_log.info("ConfigRecord (train): {...}")
        flwr_log.warning("a real warning")
        flwr_log.warning("Manually terminating ClientAppActor")
    finally:
        flwr_log.removeHandler(h)
        configure_logging(verbose=False)
        monkeypatch.delenv("FEDPEFT_VERBOSE", raising=False)
    # Assert: nothing reaches root a second time; Flower's INFO dump and shutdown chatter only with --verbose
    assert not [r for r in root_records if r.name.startswith(("fedpeft", "flwr"))]
    expected = ["ConfigRecord (train): {...}", "a real warning", "Manually terminating ClientAppActor"] if verbose \
        else ["a real warning"]
    assert flwr_seen == expected
