"""Compressed deltas on `hospitals` (DP on, seeded noise: every arm trains the same first round):
bytes up per round, final accuracy against float32, and the relative error of round 1's merged
update against float32's (the sites' float32 deltas encoded, decoded and merged). In process
(fedpeft.inprocess: the sites' own code and merge); run it alone.

Last line: int8_bytes_ratio=<x> int8_acc_delta=<y> fp16_acc_delta=<z>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ARMS = [("float32", False), ("float16", False), ("int8", False), ("int8", True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="hospitals")
    ap.add_argument("--rounds", type=int, default=0, help="server rounds (0: the preset's)")
    ap.add_argument("--out", default="runs/bench-compression")
    args = ap.parse_args()
    from fedpeft import compression, factory, site
    from fedpeft.aggregation.fedavg import fedavg
    from fedpeft.cli import simulation_config
    from fedpeft.inprocess import run_federation
    from fedpeft.models import cpu_has_native_bfloat16
    from fedpeft.runconfig import from_run_config
    from fedpeft.runtime import quiet_libraries

    quiet_libraries()
    base = ["dp-noise='seeded'"] + ([f"num-server-rounds={args.rounds}"] if args.rounds else [])
    rows = []
    for fmt, feedback in ARMS:
        over = [*base, f"delta-format='{fmt}'", f"error-feedback={'true' if feedback else 'false'}"]
        name = fmt + ("+feedback" if feedback else "")
        cfg = from_run_config(simulation_config(args.preset, over, f"{args.out}/{name}"))
        glob, results = run_federation(cfg)
        up = [sum(m["bytes-up"] for m in r.sites.values()) for r in results[1:]]
        rows.append({"format": name, "accuracy": results[-1].accuracy, "bytes_up_per_round": sum(up) / len(up)})
        print(json.dumps(rows[-1]), flush=True)
    # round 1's merged update: the same float32 deltas, each format's encode -> decode, then FedAvg
    cfg = from_run_config(simulation_config(args.preset, base, f"{args.out}/round1"))
    start = factory.initial_adapter_state(cfg)
    deltas, weights = [], []
    for s in range(cfg.federation.num_sites):
        d, m, _ = site.site_train(cfg, site=s, num_sites=cfg.federation.num_sites, server_round=1,
                                  global_state=start, privacy_json=None)
        deltas.append(d)
        weights.append(m["num-examples"])
    ref = fedavg(deltas, weights)
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in ref.values()))
    for row in rows:
        fmt = row["format"].split("+")[0]
        merged = fedavg([compression.decode(compression.encode(d, fmt), fmt) for d in deltas], weights)
        err = torch.sqrt(sum(((merged[k].double() - ref[k].double()) ** 2).sum() for k in ref))
        row["merged_rel_error"] = float(err / norm)
    f32 = rows[0]
    for row in rows:
        row["bytes_ratio"] = row["bytes_up_per_round"] / f32["bytes_up_per_round"]
        row["acc_delta"] = row["accuracy"] - f32["accuracy"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"preset={args.preset} rounds={cfg.federation.num_rounds} native_bf16={cpu_has_native_bfloat16()}")
    print("| delta-format | bytes up / round | vs float32 | final accuracy | Δ accuracy | round-1 merged rel. error |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['format']} | {r['bytes_up_per_round']:,.0f} | {r['bytes_ratio']:.3f} | {r['accuracy']:.4f} "
              f"| {r['acc_delta']:+.4f} | {r['merged_rel_error']:.2e} |")
    by = {r["format"]: r for r in rows}
    print(f"int8_bytes_ratio={by['int8']['bytes_ratio']:.3f} int8_acc_delta={by['int8']['acc_delta']:+.4f} "
          f"fp16_acc_delta={by['float16']['acc_delta']:+.4f}")


if __name__ == "__main__":
    main()
