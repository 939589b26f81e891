"""Poisoned sites against robust merges on the `attacks` preset (hospitals, 20 % of sites sending
-4 x their delta): final accuracy per merge rule (FedAvg, median, trimmed mean, norm bounding),
next to the same federation without attackers; and what validating every reply costs per round
(the apps' one validation path, ``federation.validate_train_reply``, on a round's real replies),
as a share of the round. In-process (``fedpeft.inprocess``), seeded DP noise (labelled).

Last line: fedavg_acc=<a> best_robust_acc=<b> validation_overhead=<c>
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from flwr.app import MetricRecord, RecordDict

from fedpeft import site
from fedpeft.cli import load_preset
from fedpeft.federation import ReplyLimits, to_arrays, validate_train_reply
from fedpeft.inprocess import run_federation
from fedpeft.runconfig import from_run_config, parse_overrides
from fedpeft.runtime import quiet_libraries
from fedpeft.strategy import adam_update_bound

RULES = ("fedavg", "median", "trimmed_mean", "norm_bound")


def validation_seconds(cfg, glob: dict[str, torch.Tensor], rnd: int) -> float:
    """Validate one round's replies (every site's real delta, as the server receives them)."""
    replies = []
    for s in range(cfg.federation.num_sites):
        delta, metrics, _ = site.site_train(cfg, site=s, num_sites=cfg.federation.num_sites, server_round=rnd,
                                            global_state=glob, privacy_json=None)
        replies.append(RecordDict({"arrays": to_arrays(delta), "metrics": MetricRecord(
            {k: v for k, v in metrics.items() if v == v})}))
    limits = ReplyLimits(server_round=rnd, max_update=lambda n: adam_update_bound(cfg, n))
    t = time.perf_counter()
    for content in replies:
        try:
            validate_train_reply(content, expected=glob, limits=limits)
        except Exception:
            pass  # a rejected reply costs its checks too
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="attacks")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--attacks", default="sign-flip", help="comma-separated: sign-flip, scale, random "
                    "(the last line reports sign-flip, or the first given)")
    ap.add_argument("--out", default="runs/bench-attacks")
    ap.add_argument("--run-config", action="append", default=None)
    args = ap.parse_args()
    quiet_libraries()
    base = {**load_preset(args.preset), "dp-noise": "seeded", **parse_overrides(args.run_config)}
    table, round_s = [], []
    cfg_clean = from_run_config({**base, "attack": "none", "merge": "fedavg"})
    glob, res = run_federation(cfg_clean)
    clean = res[-1].accuracy
    round_s += [r.seconds for r in res[1:]]
    print(json.dumps({"rule": "fedavg, no attackers", "accuracy": clean}), flush=True)
    attacks = args.attacks.split(",")
    for attack in attacks:
        for rule in args.rules.split(","):
            cfg = from_run_config({**base, "merge": rule, "attack": attack})
            _, res = run_federation(cfg)
            round_s += [r.seconds for r in res[1:]]
            table.append({"attack": attack, "rule": rule, "accuracy": res[-1].accuracy,
                          "per_round": [round(r.accuracy, 4) for r in res]})
            print(json.dumps(table[-1]), flush=True)
    _plot(table, clean, Path(args.out) / "attacks.png")
    head = "sign-flip" if "sign-flip" in attacks else attacks[0]
    cfg = from_run_config({**base, "merge": "fedavg", "attack": head})
    val = validation_seconds(cfg, glob, cfg.federation.num_rounds)
    overhead = val / statistics.mean(round_s)
    acc = {r["rule"]: r["accuracy"] for r in table if r["attack"] == head}
    robust = {k: v for k, v in acc.items() if k != "fedavg"}
    print(f"\nattack={cfg.federation.attack} fraction={cfg.federation.attack_fraction} "
          f"scale={cfg.federation.attack_scale} attackers={sorted(site.attackers(cfg))} "
          f"cpu={platform.processor() or platform.machine()}")
    print("| attack | merge | final accuracy |\n|---|---|---|")
    print(f"| none | fedavg (reference) | {clean:.4f} |")
    for r in table:
        print(f"| {r['attack']} | {r['rule']} | {r['accuracy']:.4f} |")
    print(f"plot: {Path(args.out) / 'attacks.png'}")
    print(f"validation: {1000 * val:.1f} ms for {cfg.federation.num_sites} replies vs a mean round of "
          f"{statistics.mean(round_s):.1f} s")
    print(f"fedavg_acc={acc.get('fedavg', float('nan')):.4f} best_robust_acc={max(robust.values()):.4f} "
          f"validation_overhead={overhead:.5f}")


def _plot(table: list[dict], clean: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in table))
    rules = list(dict.fromkeys(r["rule"] for r in table))
    acc = {(r["attack"], r["rule"]): r["accuracy"] for r in table}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rules)
    for j, rule in enumerate(rules):
        ax.bar([i + j * width for i in range(len(attacks))], [acc[(a, rule)] for a in attacks], width, label=rule)
    ax.axhline(clean, ls="--", color="gray", label="no attackers (fedavg)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(attacks))], attacks)
    ax.set_ylabel("final global accuracy")
    ax.set_title("poisoned sites (20 %) vs merge rules")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
