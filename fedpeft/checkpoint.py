"""Server checkpoints a run can resume from: after every round, the global adapter (PEFT folder),
the server optimiser's state (FedAdam/FedYogi/FedAdagrad moments), the server's RNG state and the
round number, committed last and atomically (``DIR/server-state.json``), so a kill at any point
leaves the last complete round to resume from. Metrics so far live in ``metrics.json`` and each
site's privacy state and ledger in its own folder; nothing global that a resume cannot restore.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedpeft.io import atomic_dir, atomic_write_json

STATE_FILE = "server-state.json"
MOMENTS = ("m_t", "v_t")


def checkpoint_dir(out: Path, rnd: int) -> Path:
    return out / "checkpoints" / f"round-{rnd:03d}"


def save_server_state(out: Path, rnd: int, strategy: Any) -> None:
    """Commit round ``rnd`` (its adapter checkpoint must already be on disk)."""
    moments = {f"{name}/{k}": torch.from_numpy(np.ascontiguousarray(v))
               for name in MOMENTS for k, v in (getattr(strategy, name, None) or {}).items()}
    if moments:
        with atomic_dir(out / "checkpoints" / f"strategy-{rnd:03d}") as tmp:
            save_file(moments, str(tmp / "moments.safetensors"))
    state = random.getstate()
    atomic_write_json(out / STATE_FILE, {
        "round": rnd, "moments": bool(moments),
        "random_state": [state[0], list(state[1]), state[2]],
    })


def load_server_state(out: Path) -> dict[str, Any] | None:
    path = out / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        int(state["round"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable server state ({e}); cannot resume") from e
    if not (checkpoint_dir(out, int(state["round"])) / "adapter_model.safetensors").exists():
        raise ValueError(f"{path}: round {state['round']} has no adapter checkpoint; cannot resume")
    return state


def restore(out: Path, state: dict[str, Any], strategy: Any) -> dict[str, torch.Tensor]:
    """Put the strategy and the RNG back where round ``state['round']`` left them; return its adapter."""
    rnd = int(state["round"])
    v, internal, gauss = state["random_state"]
    random.setstate((v, tuple(internal), gauss))
    if state.get("moments"):
        loaded = load_file(str(out / "checkpoints" / f"strategy-{rnd:03d}" / "moments.safetensors"))
        for name in MOMENTS:
            setattr(strategy, name, {k.split("/", 1)[1]: t.numpy() for k, t in loaded.items()
                                     if k.startswith(name + "/")})
    return {k: v.clone() for k, v in load_file(str(checkpoint_dir(out, rnd) / "adapter_model.safetensors")).items()}
