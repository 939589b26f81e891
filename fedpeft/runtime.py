"""Process-level settings for apps and the CLI (never applied on import of the library)."""

from __future__ import annotations

import logging
import os
import warnings

import torch


class FlowerQuiet(logging.Filter):
    """Flower's lines that repeat what fedpeft reports (strategy banner, config dumps, per-round
    summaries: INFO) or that only narrate Ray's shutdown; warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "Manually terminating" not in record.getMessage()


def quiet_flower(*, verbose: bool) -> None:
    """Each Flower event once (not again through a root handler Ray installs), and only the ones
    that matter unless ``verbose``; a filter, since Flower resets its logger's level on start."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.filters = [f for f in flwr_log.filters if not isinstance(f, FlowerQuiet)]
    if not verbose:
        flwr_log.addFilter(FlowerQuiet())


def quiet_libraries() -> None:
    """Silence third-party chatter that hides our own progress (load reports, RNG notices)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    noise = "Secure RNG|Full backward hook|Optimal order|renamed from|Could not find a config file"
    warnings.filterwarnings("ignore", message=f".*({noise}).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("peft").setLevel(logging.ERROR)
    quiet_flower(verbose=bool(os.environ.get("FEDPEFT_VERBOSE")))


def set_threads(cpus: float) -> None:
    """One torch thread per CPU the virtual client was given (Ray does not do this for torch)."""
    n = max(1, int(cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
