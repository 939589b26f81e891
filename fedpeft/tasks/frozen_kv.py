"""Greedy answers to a fixed set of prompts, round after round, without re-running the frozen layers.

Why: with the frozen-prefix cache the adapter lives in layers ``s:`` only, so a held-out prompt's
keys and values in layers ``:s`` are the same every round. Evaluating ``clinical-gen`` re-ran all
30 of SmolLM2's layers over every prompt each round (6.2 s of the server's 64 prompts, five times a
run, plus the sites'); this keeps layers ``:s``' keys and values and the input of layer ``s`` once
per prompt set, and each round runs only layers ``s:`` over the prompt before handing the cache to
``generate``. transformers can continue ``generate`` from a filled cache but cannot start a forward
at a middle layer, so that part is written here, as ``causal_lm.run_layers`` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class FrozenPrompts:
    """One left-padded batch of prompts, all but its last token, through the frozen layers ``:s``."""

    keys: tuple[torch.Tensor, ...]  # per frozen layer: (B, key heads, W - 1, head dim)
    values: tuple[torch.Tensor, ...]
    hidden: torch.Tensor  # the input of layer s: (B, W - 1, width)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.hidden))


def batch_key(ids: torch.Tensor, mask: torch.Tensor) -> str:
    """The batch's tokens and padding, fingerprinted: a memo entry answers only the prompts it was made from."""
    h = hashlib.sha256(str(tuple(ids.shape)).encode())
    for t in (ids, mask):
        h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def left_positions(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of left-padded rows, as ``generate`` makes them from the attention mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def freeze_prompts(body: Any, ids: torch.Tensor, mask: torch.Tensor, *, start: int) -> FrozenPrompts:
    """Layers ``:start`` over every prompt token but the last (the one ``generate`` will feed)."""
    from transformers import DynamicCache

    x, m = ids[:, :-1], mask[:, :-1]
    cache = DynamicCache(config=body.config)
    out = body(input_ids=x, attention_mask=m, position_ids=left_positions(mask)[:, :-1], cache=cache,
               use_cache=True, output_hidden_states=True)
    layers = out.cache.layers[:start]
    return FrozenPrompts(tuple(layer.keys for layer in layers), tuple(layer.values for layer in layers),
                         out.hidden_states[start])


@torch.no_grad()
def resume(body: Any, frozen: FrozenPrompts, mask: torch.Tensor, *, start: int) -> Any:
    """A cache of every layer over the prompt minus its last token: layers ``:start`` as kept,
    layers ``start:`` run now (they hold the adapter). ``generate`` continues from it."""
    from transformers import DynamicCache

    from fedpeft.tasks.causal_lm import layer_masks

    cache = DynamicCache(config=body.config)
    for i, (k, v) in enumerate(zip(frozen.keys, frozen.values)):
        cache.update(k, v, i)  # the cache concatenates into new tensors: the kept ones are never written
    hidden, m = frozen.hidden, mask[:, :-1]
    pos = left_positions(mask)[:, :-1]
    masks = layer_masks(body, hidden, m, pos)
    rope = body.rotary_emb(hidden, position_ids=pos)
    for i in range(start, len(body.layers)):
        out = body.layers[i](hidden, attention_mask=masks[i], position_embeddings=rope, position_ids=pos, cache=cache,
                             use_cache=True)
        hidden = out[0] if isinstance(out, tuple) else out
    return cache


def generate_kwargs(body: Any, memo: dict[Any, FrozenPrompts], key: Any, ids: torch.Tensor, mask: torch.Tensor,
                    *, start: int) -> Mapping[str, Any]:
    """``generate``'s extra arguments for one batch: a cache resumed from the kept frozen layers
    (computed on the batch's first use, then kept in ``memo`` under ``key``); none with sliding-window
    layers (Mistral's), whose cache holds only the window."""
    from fedpeft.tasks.causal_lm import layer_kinds

    if start <= 0 or ids.shape[1] < 2 or "sliding_attention" in layer_kinds(body):
        return {}  # a sliding-window layer keeps only its window: generate would recompute the prompt anyway
    frozen = memo.get(key)
    if frozen is None:
        frozen = memo[key] = freeze_prompts(body, ids, mask, start=start)
    return {"cache": resume(body, frozen, mask, start=start)}
