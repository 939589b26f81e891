"""Per-example reductions shared by the methods' grad samplers."""

from __future__ import annotations

import torch


def per_example_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum over positions of a * b, per example and channel: (n, ..., c) x2 -> (n, c).

    Written as a product and a sum, not einsum("n...c,n...c->nc"): einsum takes a batched-matmul
    path with (n*c) batches of 1x1 products, four times slower on CPU at transformer shapes. The
    product is taken in ``dtype`` (at least one factor cast; the other is promoted inside the kernel,
    not copied), so bfloat16 activations are never summed in bfloat16."""
    if a.dtype != dtype and b.dtype != dtype:
        a = a.to(dtype)
    return (a * b).reshape(a.shape[0], -1, a.shape[-1]).sum(1)


def per_example_sum(a: torch.Tensor) -> torch.Tensor:
    """sum over positions, per example and channel: (n, ..., c) -> (n, c)."""
    return a.reshape(a.shape[0], -1, a.shape[-1]).sum(1)
