"""The blockwise cross-entropy against PyTorch's own, values and gradients."""

from __future__ import annotations

import pytest
import torch

from fedpeft.tasks.token_ce import IGNORE, token_cross_entropy


def _case(device: torch.device, dtype: torch.dtype, n: int = 37, v: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, dtype=torch.float64) * 4).to(device, dtype)
    target = torch.randint(0, v, (n,), generator=g).to(device)
    target[::5] = IGNORE  # ignored rows among the others, one of them the last block's
    weights = torch.rand(n, generator=g, dtype=torch.float64).to(device)  # an uneven upstream gradient
    return logits, target, weights


@pytest.mark.parametrize("block", [1, 8, 16, 64])
def test_values_and_gradients_equal_torch_cross_entropy_in_float64(device, block):
    # Prepare: 37 rows, so no block size divides them
    logits, target, weights = _case(device, torch.float64)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()

    # Execute
    mine = token_cross_entropy(a, target, block=block)
    (mine * weights).sum().backward()
    ref = torch.nn.functional.cross_entropy(b, target, reduction="none")
    (ref * weights).sum().backward()

    # Assert: float64 throughout, so equal to rounding; ignored rows give 0 and no gradient
    assert mine.dtype == torch.float64
    torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    ignored = target == IGNORE
    assert torch.all(mine[ignored] == 0) and torch.all(a.grad[ignored] == 0)
    assert mine[~ignored].min() > 0


def test_bfloat16_logits_give_float32_losses_as_close_as_the_stock_path(device):
    # Prepare: the stock path casts bfloat16 logits to float32 first; so does each block here
    logits, target, weights = _case(device, torch.bfloat16, n=50, v=5000, seed=1)
    exact = logits.double().requires_grad_()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()

    # Execute
    mine = token_cross_entropy(a, target)
    (mine * weights.float()).sum().backward()
    stock = torch.nn.functional.cross_entropy(b.float(), target, reduction="none")
    (stock * weights.float()).sum().backward()
    ref = torch.nn.functional.cross_entropy(exact, target, reduction="none")
    (ref * weights).sum().backward()

    # Assert: losses in float32; both gradients are bfloat16 roundings of the same float64 values
    assert mine.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(mine.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    scale = exact.grad.abs().max()
    assert float((a.grad.double() - exact.grad).abs().max()) <= float(scale) * 2**-8
    assert float((a.grad.double() - exact.grad).abs().max()) <= 2 * float((b.grad.double() - exact.grad).abs().max()) + 1e-12


def test_without_a_gradient_it_only_scores_and_bad_shapes_are_refused():
    # Prepare
    logits, target, _ = _case(torch.device("cpu"), torch.float32)

    # Execute
    with torch.no_grad():
        out = token_cross_entropy(logits, target)

    # Assert
    torch.testing.assert_close(out, torch.nn.functional.cross_entropy(logits, target, reduction="none"),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"logits \(37, 1000\) and target \(36,\)"):
        token_cross_entropy(logits, target[:-1])
