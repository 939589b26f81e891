"""Every heterogeneous-rank rule on the `hetero-hospitals` preset, same seeds, plus an equal-rank
FedAvg reference: a table (final accuracy, bytes up and down per round, merge time) and a PNG of
global accuracy per round per rule. Runs in-process (``fedpeft.inprocess``: the sites' own code,
the strategy's own merge, no Ray); seeded DP noise (labelled), so reruns repeat.

    python simulations/hetero_ranks.py [--seeds 0,1] [--rules zero_pad,svd,stack,frozen_a]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from fedpeft.cli import load_preset
from fedpeft.inprocess import run_federation
from fedpeft.runconfig import from_run_config, parse_overrides
from fedpeft.runtime import quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="hetero-hospitals")
    ap.add_argument("--rules", default="zero_pad,svd,stack,frozen_a")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--reference-rank", type=int, default=8, help="rank of the equal-rank FedAvg reference")
    ap.add_argument("--out", default="runs/hetero-ranks")
    ap.add_argument("--run-config", action="append", default=None)
    args = ap.parse_args()
    quiet_libraries()
    base = {**load_preset(args.preset), "dp-noise": "seeded", **parse_overrides(args.run_config)}
    runs = [(rule, {"merge": rule}) for rule in args.rules.split(",")]
    runs.append((f"fedavg r={args.reference_rank} (equal ranks)",
                 {"merge": "fedavg", "lora-ranks": "", "lora-rank": args.reference_rank}))
    table, curves = [], {}
    for name, over in runs:
        accs, ups, downs, merges, curve = [], [], [], [], []
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = from_run_config({**base, **over, "seed": seed})
            t = time.perf_counter()
            _, res = run_federation(cfg)
            wall = time.perf_counter() - t
            accs.append(res[-1].accuracy)
            ups.append(statistics.mean(sum(m["bytes-up"] for m in r.sites.values()) for r in res[1:]))
            downs.append(statistics.mean(r.bytes_down for r in res[1:]))
            merges.append(statistics.mean(r.merge_seconds for r in res[1:]))
            curve.append([r.accuracy for r in res])
            print(json.dumps({"rule": name, "seed": seed, "accuracy": res[-1].accuracy, "wall_s": round(wall, 1),
                              "per_round": [round(r.accuracy, 4) for r in res]}), flush=True)
        table.append({"rule": name, "accuracy": statistics.mean(accs), "accuracy_min": min(accs),
                      "bytes_up_per_round": statistics.mean(ups), "bytes_down_per_round": statistics.mean(downs),
                      "merge_ms": 1000 * statistics.mean(merges)})
        curves[name] = [statistics.mean(c[i] for c in curve) for i in range(len(curve[0]))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hetero_ranks.json").write_text(json.dumps({"table": table, "curves": curves, "seeds": args.seeds,
                                                       "cpu": platform.processor() or platform.machine()}, indent=2))
    _plot(curves, out / "hetero_ranks.png")
    print(f"\nranks {base.get('lora-ranks')} cycled over sites; seeds {args.seeds}\n")
    print("| rule | final accuracy (mean) | min over seeds | bytes up / round | bytes down / round | merge ms |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['rule']} | {r['accuracy']:.4f} | {r['accuracy_min']:.4f} | {r['bytes_up_per_round']:,.0f} | "
              f"{r['bytes_down_per_round']:,.0f} | {r['merge_ms']:.1f} |")
    print(f"plot: {out / 'hetero_ranks.png'}")


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        ax.plot(range(len(ys)), ys, marker="o", ls="--" if name.startswith("fedavg") else "-", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("global accuracy")
    ax.set_title("hetero-hospitals: mixed LoRA ranks (4, 8, 16, 32)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
