"""Process-level settings for apps and the CLI (never applied on import of the library)."""

from __future__ import annotations

import logging
import os
import warnings

import torch


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


def set_threads(cpus: float) -> None:
    """One torch thread per CPU the virtual client was given (Ray does not do this for torch)."""
    n = max(1, int(cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
