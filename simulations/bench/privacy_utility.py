"""Privacy-utility curve of the `hospitals` preset: final global accuracy at per-site epsilon in
{1, 2, 4, 8, inf}, one table and one PNG, plus empirical lower bounds on epsilon (white-box
gradient canaries through each run's own DP step, one-run bounds at 95 % confidence) for the
epsilon=8 run and for a deliberately broken run (no noise) that claims epsilon=1.

Runs in-process (``fedpeft.inprocess``: the sites' own code, no Ray), seeded noise (labelled).
Last line: eps8_acc=<x> eps1_acc=<y> eps8_lower_bound=<z>
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

from fedpeft.cli import load_preset
from fedpeft.inprocess import run_federation
from fedpeft.privacy.audit.canaries import run_gradient_canaries
from fedpeft.runconfig import from_run_config, parse_overrides
from fedpeft.runtime import quiet_libraries
from fedpeft.training import expected_sample_rate


def _site0_mechanism(cfg, results) -> tuple[float, float, int]:
    """(sigma, q, steps over the run) of site 0, as its ledger would record them."""
    sites = [r.sites[0] for r in results[1:] if 0 in r.sites]
    q = expected_sample_rate(num_examples=int(sites[0]["num-examples"]), batch_size=cfg.train.batch_size)
    return sites[0]["noise-multiplier"], q, int(sum(s["steps"] for s in sites))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="hospitals")
    ap.add_argument("--epsilons", default="1,2,4,8,inf")
    ap.add_argument("--out", default="runs/bench-privacy-utility")
    ap.add_argument("--canaries", type=int, default=2000)
    ap.add_argument("--run-config", action="append", default=None, help='overrides, e.g. "seed=1"')
    args = ap.parse_args()
    quiet_libraries()
    base = {**load_preset(args.preset), "dp-noise": "seeded", **parse_overrides(args.run_config)}
    rows: list[dict[str, float]] = []
    mech: dict[float, tuple[float, float, int]] = {}
    for e in [float(x) for x in args.epsilons.split(",")]:
        flat = {**base, "dp": math.isfinite(e)}
        if math.isfinite(e):
            flat["target-epsilon"] = e
        cfg = from_run_config(flat)
        t = time.perf_counter()
        _, results = run_federation(cfg)
        row = {"epsilon": e, "accuracy": results[-1].accuracy, "wall_s": time.perf_counter() - t}
        if math.isfinite(e):
            mech[e] = _site0_mechanism(cfg, results)
            row["max_site_epsilon"] = max(s["epsilon"] for r in results[1:] for s in r.sites.values())
        rows.append(row)
        print(json.dumps(row), flush=True)
    acc = {r["epsilon"]: r["accuracy"] for r in rows}
    lb8 = broken = float("nan")
    if 8.0 in mech:
        sigma, q, steps = mech[8.0]
        a = run_gradient_canaries(sigma=sigma, sample_rate=q, steps=steps, canaries=args.canaries)
        lb8 = max(a.epsilon_lower_bound, a.epsilon_lower_bound_fdp)
        print(f"eps=8 site 0: sigma={sigma:.3f} q={q:.3f} steps={steps}: lower bound {lb8:.3f} "
              f"(Steinke {a.epsilon_lower_bound:.3f}, f-DP {a.epsilon_lower_bound_fdp:.3f})")
    if 1.0 in mech:
        _, q, steps = mech[1.0]
        b = run_gradient_canaries(sigma=0.0, sample_rate=q, steps=steps, canaries=args.canaries)
        broken = max(b.epsilon_lower_bound, b.epsilon_lower_bound_fdp)
        print(f"broken run (no noise) claiming eps=1: lower bound {broken:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_utility.json").write_text(json.dumps({"rows": rows, "eps8_lower_bound": lb8,
                                                          "broken_eps1_lower_bound": broken,
                                                          "machine": platform.processor() or platform.machine()},
                                                         indent=2))
    _plot(rows, out / "privacy_utility.png")
    print("| epsilon per site | final accuracy | wall s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['epsilon']:g} | {r['accuracy']:.4f} | {r['wall_s']:.0f} |")
    print(f"plot: {out / 'privacy_utility.png'}")
    print(f"eps8_acc={acc.get(8.0, float('nan')):.4f} eps1_acc={acc.get(1.0, float('nan')):.4f} "
          f"eps8_lower_bound={lb8:.3f}")


def _plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r for r in rows if math.isfinite(r["epsilon"])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["epsilon"] for r in finite], [r["accuracy"] for r in finite], marker="o", label="DP (per site)")
    for r in rows:
        if not math.isfinite(r["epsilon"]):
            ax.axhline(r["accuracy"], ls="--", color="gray", label="no DP (ε = ∞)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("per-site ε (δ = 1e-5)")
    ax.set_ylabel("final global accuracy")
    ax.set_title("hospitals: privacy–utility")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
