"""Site-side throughput on a preset: how close a round comes to its arithmetic, and what DP costs.

One process, no Flower or Ray (``fedpeft.inprocess``), so it also runs on a GPU machine with the
GPU kit. Measured in this one run, on the same sites and cached data:
- DP rounds (seeded noise, so the run repeats) and the same rounds without DP;
- inside those DP rounds, the time of their forward and backward passes alone (``training``
  times every pass; on a GPU the pass ends when its loss reaches the host).
overhead_ratio = mean DP round time (rounds 2..N) / mean time of those rounds' forward/backward passes;
dp_round_ratio = mean DP round time (rounds 2..N) / mean non-DP round time (rounds 2..N).
Round 1 pays one-time work (data, tokens, frozen prefix, noise calibration) and is left out.

Last line: device=<cpu|cuda> overhead_ratio=<x> dp_round_ratio=<y>
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from fedpeft import models
from fedpeft.cli import load_preset
from fedpeft.inprocess import run_federation
from fedpeft.runconfig import from_run_config, parse_overrides
from fedpeft.runtime import quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hospitals")
    ap.add_argument("--run-config", action="append", default=None, help='overrides, e.g. "precision=\'float32\'"')
    ap.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: all cores)")
    args = ap.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    flat = {**load_preset(args.preset), **parse_overrides(args.run_config), "dp-noise": "seeded"}
    cfg = from_run_config(flat)
    device = models.select_device()
    precision = models.resolve_precision(cfg.model.precision, device)
    _, dp = run_federation(cfg)
    _, nodp = run_federation(dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=False)))
    later = range(2, cfg.federation.num_rounds + 1)
    passes = [sum(m["pass-seconds"] for m in dp[r].sites.values()) for r in later]
    dp_s = statistics.mean(dp[r].seconds for r in later)
    nodp_s = statistics.mean(nodp[r].seconds for r in later)
    floor_s = statistics.mean(passes)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"preset={args.preset} device={name} precision={precision} sites={cfg.federation.num_sites} "
          f"rounds={cfg.federation.num_rounds} notes={sum(m['num-examples'] for m in dp[1].sites.values()):.0f}")
    print(f"round_s_dp={[round(r.seconds, 2) for r in dp[1:]]} round_s_nodp={[round(r.seconds, 2) for r in nodp[1:]]}")
    print(f"pass_s={[round(f, 2) for f in passes]} acc_dp={dp[-1].accuracy:.4f} acc_nodp={nodp[-1].accuracy:.4f}")
    print(f"device={device.type} overhead_ratio={dp_s / floor_s:.3f} dp_round_ratio={dp_s / nodp_s:.3f}")


if __name__ == "__main__":
    main()
