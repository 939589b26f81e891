"""`svd` heterogeneous-rank merge at 7B scale: 100 sites, 4096×4096 modules (a 7B model's q and v
projections), ranks drawn from {4, 8, 16, 32, 64}; time and peak memory of fedpeft's factored
path against the dense-matrix SVD of the same weighted sum (float32 factors, as adapters ship).

Each method runs in its own fresh process; peak memory is the resident set sampled every
millisecond during the merge, above what it was before (the inputs).
Last line: svd_qr_vs_dense_time_ratio=<x>
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import threading
import time

import torch

RANKS = (4, 8, 16, 32, 64)


def _inputs(seed: int, sites: int, d: int):
    g = torch.Generator().manual_seed(seed)
    ranks = [RANKS[i] for i in torch.randint(len(RANKS), (sites,), generator=g).tolist()]
    As = [torch.randn(r, d, generator=g) / d**0.5 for r in ranks]
    Bs = [torch.randn(d, r, generator=g) * 0.01 for r in ranks]
    weights = torch.rand(sites, generator=g).add(0.5).tolist()
    scalings = [16.0 / r for r in ranks]
    return As, Bs, scalings, weights, ranks


def _dense(As, Bs, scalings, weights, max_rank):
    """The reference: form W = Σ p_k s_k B_k A_k densely, full SVD, truncate."""
    total = sum(weights)
    W = torch.cat([w / total * s * b for b, s, w in zip(Bs, scalings, weights)], 1) @ torch.cat(As, 0)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :max_rank] * S[:max_rank], Vh[:max_rank]


def _sample_rss(proc, stop: threading.Event, high: list[int]) -> None:
    """The merge's resident high-water mark, sampled every millisecond until ``stop``."""
    while not stop.is_set():
        high[0] = max(high[0], proc.memory_info().rss)
        time.sleep(0.001)


def _worker(method: str, modules: int, sites: int, d: int, q) -> None:
    torch.set_num_threads(2)
    import psutil

    from fedpeft.aggregation.hetero import svd

    proc = psutil.Process()
    seconds, peak, out = 0.0, 0, []
    for m in range(modules):
        As, Bs, s, w, ranks = _inputs(m, sites, d)
        before = proc.memory_info().rss
        high = [before]
        stop = threading.Event()

        sampler = threading.Thread(target=_sample_rss, args=(proc, stop, high), daemon=True)
        sampler.start()
        t = time.perf_counter()
        if method == "qr":
            res = svd(As, Bs, s, w, max_rank=max(RANKS))
            out.append((res.B, res.A))
        else:
            out.append(_dense(As, Bs, s, w, max(RANKS)))
        seconds += time.perf_counter() - t
        stop.set()
        sampler.join()
        peak = max(peak, high[0] - before)
    # the two methods' rank-64 products must agree (same best approximation)
    q.put({"method": method, "seconds": seconds, "peak_extra_bytes": peak,
           "sum_rank": sum(ranks), "products": [(b @ a)[:64, :64].tolist() for b, a in out[:1]]})


def _run(method: str, modules: int, sites: int, d: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(method, modules, sites, d, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--modules", type=int, default=4, help="4096×4096 modules merged per method")
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--dim", type=int, default=4096)
    args = ap.parse_args()
    qr = _run("qr", args.modules, args.sites, args.dim)
    dense = _run("dense", args.modules, args.sites, args.dim)
    a, b = torch.tensor(qr.pop("products")), torch.tensor(dense.pop("products"))
    rel = float((a - b).norm() / b.norm())
    factor_bytes = 2 * args.dim * qr["sum_rank"] * 4  # (d_in + d_out)·Σr float32 values
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "modules": args.modules,
                      "sites": args.sites, "dim": args.dim, "qr": qr, "dense": dense}))
    print(f"{args.modules} modules of {args.dim}x{args.dim}, {args.sites} sites, sum of ranks {qr['sum_rank']} "
          f"(last module): factored {qr['seconds']:.1f} s vs dense {dense['seconds']:.1f} s; peak extra memory "
          f"{qr['peak_extra_bytes'] / 2**20:.0f} MiB = {qr['peak_extra_bytes'] / factor_bytes:.2f} x (d_in+d_out)·Σr·4 B "
          f"vs dense {dense['peak_extra_bytes'] / 2**20:.0f} MiB; products agree to {rel:.1e} (relative)")
    print(f"svd_qr_vs_dense_time_ratio={qr['seconds'] / dense['seconds']:.3f}")


if __name__ == "__main__":
    main()
