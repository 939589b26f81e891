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

import torch
from flwr.app import MetricRecord, RecordDict

from fedpeft import site
from fedpeft.cli import load_preset
from fedpeft.config import from_run_config, parse_overrides
from fedpeft.federation import ReplyLimits, to_arrays, validate_train_reply
from fedpeft.inprocess import run_federation
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
    for rule in args.rules.split(","):
        cfg = from_run_config({**base, "merge": rule})
        _, res = run_federation(cfg)
        round_s += [r.seconds for r in res[1:]]
        table.append({"rule": rule, "accuracy": res[-1].accuracy, "per_round": [round(r.accuracy, 4) for r in res]})
        print(json.dumps(table[-1]), flush=True)
    cfg = from_run_config({**base, "merge": "fedavg"})
    val = validation_seconds(cfg, glob, cfg.federation.num_rounds)
    overhead = val / statistics.mean(round_s)
    acc = {r["rule"]: r["accuracy"] for r in table}
    robust = {k: v for k, v in acc.items() if k != "fedavg"}
    print(f"\nattack={cfg.federation.attack} fraction={cfg.federation.attack_fraction} "
          f"scale={cfg.federation.attack_scale} attackers={sorted(site.attackers(cfg))} "
          f"cpu={platform.processor() or platform.machine()}")
    print("| merge | final accuracy |\n|---|---|")
    print(f"| fedavg, no attackers (reference) | {clean:.4f} |")
    for r in table:
        print(f"| {r['rule']} | {r['accuracy']:.4f} |")
    print(f"validation: {1000 * val:.1f} ms for {cfg.federation.num_sites} replies vs a mean round of "
          f"{statistics.mean(round_s):.1f} s")
    print(f"fedavg_acc={acc.get('fedavg', float('nan')):.4f} best_robust_acc={max(robust.values()):.4f} "
          f"validation_overhead={overhead:.5f}")


if __name__ == "__main__":
    main()
