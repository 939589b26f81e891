"""Heterogeneous-rank LoRA merges: pure functions over one module's per-site factors.

Written by hand: peft merges adapters of one model (``utils/merge_utils.py``), not sites' factors
of different ranks; Flower averages same-shaped arrays only.

Conventions (every rule): site k sends A_k (r_k × d_in), B_k (d_out × r_k) with LoRA scaling
s_k (α/r_k, or α/√r_k with rsLoRA), so its update is s_k·B_k·A_k; weights p_k ≥ 0 are normalised
to sum to 1. A rule returns global factors (A_g, B_g) with **scaling 1**: the merged update is
B_g·A_g. Site k later starts from the leading r_k components: A_g[:r_k], B_g[:, :r_k] / s_k
(``project``), which for ``svd`` is the best rank-r_k approximation of the merged update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedpeft.registry import Registry

Tensor = torch.Tensor


class RankMergeError(ValueError):
    """Factors, ranks or weights that no rule can merge; the message names what is wrong."""


@dataclass
class MergedModule:
    A: Tensor  # (r_g, d_in)
    B: Tensor  # (d_out, r_g); the merged update is B @ A (scaling 1)
    dropped_energy: float = 0.0  # fraction of the merged update's squared Frobenius norm cut by truncation


RankMergeFn = Callable[..., MergedModule]
RANK_MERGES: Registry[RankMergeFn] = Registry("rank merge rule", "merge")
register_rank_merge = RANK_MERGES.register
create_rank_merge = RANK_MERGES.get
rank_merges = RANK_MERGES.names


def lora_scaling(alpha: float, rank: int, *, rslora: bool) -> float:
    """peft's LoRA scaling: α/r, or α/√r with rank-stabilised LoRA."""
    return alpha / rank ** 0.5 if rslora else alpha / rank


def check_factors(As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float], weights: Sequence[float],
           max_rank: int | None = None) -> list[float]:
    """Validate shapes, ranks and weights; return normalised weights."""
    if not As:
        raise RankMergeError("no factors to merge")
    if not len(As) == len(Bs) == len(scalings) == len(weights):
        raise RankMergeError(f"{len(As)} A, {len(Bs)} B, {len(scalings)} scalings and {len(weights)} weights differ")
    if any(not (w >= 0) for w in weights) or not sum(weights) > 0:
        raise RankMergeError(f"weights={list(weights)}: must be >= 0 with a positive sum")
    d_in, d_out = As[0].shape[1], Bs[0].shape[0]
    for k, (a, b) in enumerate(zip(As, Bs)):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise RankMergeError(f"site {k}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a LoRA pair "
                                 f"for a {d_out}x{d_in} module")
        if max_rank is not None and a.shape[0] > max_rank:
            raise RankMergeError(f"site {k}: rank {a.shape[0]} is above the declared maximum {max_rank}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


@register_rank_merge("zero_pad")
def zero_pad(As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float], weights: Sequence[float],
             *, max_rank: int) -> MergedModule:
    """HetLoRA: pad every A_k and s_k·B_k with zeros to ``max_rank``, then average each factor."""
    p = check_factors(As, Bs, scalings, weights, max_rank)
    d_in, d_out = As[0].shape[1], Bs[0].shape[0]
    A = torch.zeros(max_rank, d_in, dtype=torch.float64)
    B = torch.zeros(d_out, max_rank, dtype=torch.float64)
    for a, b, s, w in zip(As, Bs, scalings, p):
        r = a.shape[0]
        A[:r] += w * a.double()
        B[:, :r] += w * s * b.double()
    return MergedModule(A, B)


def check_shared_a(As: Sequence[Tensor], shared_A: Tensor, max_rank: int) -> None:
    """``frozen_a``: every site's A must be the leading rows of the shared frozen A."""
    if shared_A.shape[0] != max_rank:
        raise RankMergeError(f"shared A has rank {shared_A.shape[0]}, expected {max_rank}")
    for k, a in enumerate(As):
        if not torch.equal(a.to(shared_A.dtype), shared_A[: a.shape[0]]):
            raise RankMergeError(f"site {k}: its A is not the shared frozen A (frozen_a needs A untouched)")


@register_rank_merge("frozen_a")
def frozen_a(As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float], weights: Sequence[float],
             *, max_rank: int, shared_A: Tensor) -> MergedModule:
    """FFA-LoRA, nested: every site's A_k is ``shared_A[:r_k]`` (frozen), so
    Σ p_k s_k B_k A_k = (Σ p_k s_k pad(B_k)) · shared_A exactly: a plain weighted sum of B."""
    p = check_factors(As, Bs, scalings, weights, max_rank)
    check_shared_a(As, shared_A, max_rank)
    B = torch.zeros(Bs[0].shape[0], max_rank, dtype=torch.float64)
    for b, s, w in zip(Bs, scalings, p):
        B[:, : b.shape[1]] += w * s * b.double()
    return MergedModule(shared_A.double().clone(), B)


@register_rank_merge("stack")
def stack(As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float], weights: Sequence[float],
          *, max_rank: int | None = None) -> MergedModule:
    """FLoRA: concatenate [p_k s_k B_k] and [A_k] along the rank: B·A = Σ p_k s_k B_k A_k exactly,
    at rank Σ r_k (sites fold it into their frozen base and restart their adapter)."""
    p = check_factors(As, Bs, scalings, weights, max_rank)
    A = torch.cat([a.double() for a in As], dim=0)
    B = torch.cat([w * s * b.double() for b, s, w in zip(Bs, scalings, p)], dim=1)
    return MergedModule(A, B)


def _gram(X: Tensor, *, transposed: bool = False) -> Tensor:
    """X·Xᵀ (or Xᵀ·X when ``transposed``) through BLAS syrk (half the work of a matmul); only the
    upper triangle is filled."""
    import scipy.linalg.blas as blas

    syrk = blas.dsyrk if X.dtype == torch.float64 else blas.ssyrk
    # X row-major is Xᵀ column-major: syrk on it without a copy (trans=1: X·Xᵀ, trans=0: Xᵀ·X)
    return torch.from_numpy(syrk(1.0, X.contiguous().numpy().T, trans=0 if transposed else 1))


def _times_upper_t(X: Tensor, U: Tensor) -> Tensor:
    """X·Uᵀ for an upper-triangular U through BLAS trmm (in place on a copy of X)."""
    import scipy.linalg.blas as blas

    trmm = blas.dtrmm if X.dtype == torch.float64 else blas.strmm
    # (X·Uᵀ)ᵀ = U·Xᵀ, and Xᵀ column-major is X row-major: trmm(left, upper) without transposes
    out = trmm(1.0, U.numpy(), X.contiguous().numpy().T, side=0, lower=0, trans_a=0, overwrite_b=0)
    return torch.from_numpy(out.T)


def _upper_chol_of_gram(X: Tensor) -> Tensor | None:
    """U with X·Xᵀ = Uᵀ·U (LAPACK potrf on syrk's upper triangle), or None when X is
    rank-deficient or too ill-conditioned for CholeskyQR."""
    import scipy.linalg.lapack as lapack

    potrf = lapack.dpotrf if X.dtype == torch.float64 else lapack.spotrf
    U, info = potrf(_gram(X).numpy(), lower=0, clean=1, overwrite_a=1)
    if info != 0:
        return None
    d = abs(U.diagonal())
    # CholeskyQR loses orthogonality as eps·cond(X)²: keep it only for well-conditioned stacks
    eps = float(torch.finfo(X.dtype).eps)
    return torch.from_numpy(U) if d.min() > 10 * eps**0.5 * d.max() else None


def _top_eigh(H: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest eigenpairs of a symmetric matrix given by its upper triangle, largest first
    (LAPACK's subset driver when k is a small share of the size: it skips the other eigenvectors)."""
    import scipy.linalg

    n = H.shape[0]
    if k < n // 2:
        w, V = scipy.linalg.eigh(H.numpy(), lower=False, subset_by_index=[n - k, n - 1], driver="evr")
    else:
        w, V = scipy.linalg.eigh(H.numpy(), lower=False)
        w, V = w[n - k:], V[:, n - k:]
    return torch.from_numpy(w.copy()).flip(0), torch.from_numpy(V.copy()).flip(1)


@register_rank_merge("svd")
def svd(As: Sequence[Tensor], Bs: Sequence[Tensor], scalings: Sequence[float], weights: Sequence[float],
        *, max_rank: int, rank: int | None = None) -> MergedModule:
    """FlexLoRA/HLoRA: W = Σ p_k s_k B_k A_k truncated to ``rank`` (default ``max_rank``) by SVD,
    without the dense d_out×d_in matrix unless that is smaller: the stacked A (R × d_in, R = Σ r_k)
    is factorised A = Uᵀ·Q (QR via CholeskyQR: U is the Cholesky factor of its R×R Gram, computed
    with BLAS syrk and LAPACK potrf; Householder QR if the Gram is singular), so W = (B·Uᵀ)·Q and
    W's singular triplets are those of the small core C = B·Uᵀ (d_out × R), whose top ones come
    from an eigendecomposition of its R×R Gram (LAPACK's subset driver). Components come out in decreasing
    singular value, √σ on each side, so truncating to r_k is the best rank-r_k approximation.
    Computes in float64 when the factors are float64, else float32."""
    p = check_factors(As, Bs, scalings, weights, max_rank)
    dt = torch.float64 if any(t.dtype == torch.float64 for t in (*As, *Bs)) else torch.float32
    Bs_ = torch.cat([w * s * b.to(dt) for b, s, w in zip(Bs, scalings, p)], dim=1)  # d_out × R
    As_ = torch.cat([a.to(dt) for a in As], dim=0)  # R × d_in
    R, d_out, d_in = As_.shape[0], Bs_.shape[0], As_.shape[1]
    target = max_rank if rank is None else rank
    r = min(target, R, d_out, d_in)
    if R >= min(d_out, d_in):  # the stacked rank is no smaller than the matrix: dense is cheaper
        W = Bs_ @ As_
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        energy = float((S.double() ** 2).sum())
        left, sig, right = U[:, :r], S[:r], Vh[:r]
    else:
        U = _upper_chol_of_gram(As_)  # As·Asᵀ = Uᵀ·U, so As = Uᵀ·Q with Q·Qᵀ = I
        Qa = None
        if U is None:  # ill-conditioned or rank-deficient stack: Householder QR, Asᵀ = Qa·Ra (Ra plays U)
            Qa, U = torch.linalg.qr(As_.T)
        C = _times_upper_t(Bs_, U)  # the core: W = C·Q
        H = _gram(C, transposed=True)  # Cᵀ·C (R × R), upper triangle
        energy = float(torch.diagonal(H).double().sum())  # ‖W‖²_F = ‖C‖²_F
        w, V = _top_eigh(H, r)
        sig = w.clamp_min(0).sqrt()
        keep = sig > sig[0] * torch.finfo(dt).eps * R if r else sig > 0
        sig, V = sig[keep], V[:, keep]
        left = (C @ V) / sig
        # right singular vectors: Qᵀ·V = Asᵀ·U⁻¹·V (a triangular solve on r columns)
        right = (Qa @ V).T if Qa is not None else torch.linalg.solve_triangular(U, V, upper=True).T @ As_
    kept = float((sig.double() ** 2).sum())
    dropped = max(0.0, (energy - kept) / energy) if energy > 0 else 0.0
    root = sig.sqrt()
    n = root.shape[0]
    A = torch.zeros(target, d_in, dtype=dt)
    B = torch.zeros(d_out, target, dtype=dt)
    A[:n] = root[:, None] * right[:n]
    B[:, :n] = left[:, :n] * root[None, :]
    return MergedModule(A, B, dropped)


def project(A_g: Tensor, B_g: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor]:
    """A site's starting factors from the global ones: the leading ``rank`` components, B divided by
    the site's scaling so that s·B·A reproduces B_g[:, :rank]·A_g[:rank]."""
    if rank > A_g.shape[0]:
        raise RankMergeError(f"rank {rank} is above the global adapter's rank {A_g.shape[0]}")
    return A_g[:rank].clone(), B_g[:, :rank] / scaling
