"""What a site puts in its masked vector, and how the coordinator reads the sum back.

Only linear merges survive masking: the coordinator learns one sum. So each site sends
``[w * v, w]`` with ``v`` its update in the global layout and ``w`` its merge weight (its example
count), and the coordinator divides the first part by the last coordinate:
- ``fedavg`` (equal ranks): ``v`` is the delta itself;
- ``frozen_a`` (mixed ranks, nested FFA-LoRA): ``v`` holds ``s_k * pad(B_k)`` at the global rank
  for every LoRA module (``A`` is frozen and shared) plus the other trained tensors (the head), so
  the sum is exactly ``hetero.frozen_a``'s weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


class LayoutError(ValueError):
    """A site's update does not fit the round's layout; the message names the tensor."""


@dataclass(frozen=True)
class Layout:
    """Keys and global shapes of the summed tensors, in order; one weight coordinate follows."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> Layout:
        return cls(tuple((k, tuple(tensors[k].shape)) for k in sorted(tensors)))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes) + 1

    def pack(self, update: Mapping[str, torch.Tensor], weight: float, *, pad_dim: Mapping[str, int] | None = None
             ) -> np.ndarray:
        """``[weight * update, weight]`` as float64. ``pad_dim``: key -> the dimension along which a
        lower-rank tensor is zero-padded to the global shape (LoRA B: 1)."""
        missing = sorted(set(k for k, _ in self.shapes) - set(update))
        extra = sorted(set(update) - set(k for k, _ in self.shapes))
        if missing or extra:
            raise LayoutError(f"update: keys differ from the round's layout (missing {missing[:3]}, extra {extra[:3]})")
        parts = []
        for k, shape in self.shapes:
            t = update[k].detach().to(torch.float64).cpu()
            if tuple(t.shape) != shape:
                dim = (pad_dim or {}).get(k)
                if dim is None or t.dim() != len(shape) or t.shape[dim] > shape[dim] or \
                        any(a != b for i, (a, b) in enumerate(zip(t.shape, shape)) if i != dim):
                    raise LayoutError(f"{k}: shape {tuple(t.shape)} does not fit the global {shape}")
                full = torch.zeros(shape, dtype=torch.float64)
                full.narrow(dim, 0, t.shape[dim]).copy_(t)
                t = full
            parts.append(weight * t.reshape(-1).numpy())
        parts.append(np.array([weight], dtype=np.float64))
        return np.concatenate(parts)

    def unpack_mean(self, total: np.ndarray) -> tuple[dict[str, torch.Tensor], float]:
        """(sum of w * update / sum of w, sum of w) from a decoded sum."""
        if total.shape != (self.size,):
            raise LayoutError(f"sum: {total.shape[0]} values, the layout has {self.size}")
        weight = float(total[-1])
        if not weight > 0:
            raise LayoutError(f"sum: total weight {weight!r} must be > 0")
        out, at = {}, 0
        for k, shape in self.shapes:
            n = math.prod(shape)
            out[k] = torch.from_numpy(total[at:at + n] / weight).reshape(shape)
            at += n
        return out, weight
