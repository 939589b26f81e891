"""Default `hospitals` preset: wall time with DP, final accuracy with DP vs without DP vs
centralised non-private training on the union of the hospitals' data, and bytes on the wire.

Last line: wall_s=<x> dp_vs_nodp_acc_ratio=<y> bytes_fraction=<z>
"""

from __future__ import annotations

import argparse
import time

import torch

from fedpeft.centralised import train_centralised
from fedpeft.cli import simulate, simulation_config
from fedpeft.runconfig import from_run_config
from fedpeft.runtime import quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="hospitals")
    ap.add_argument("--out", default="runs/bench-fedsim")
    ap.add_argument("--run-config", action="append", default=None,
                    help='overrides in Flower\'s syntax, e.g. "seed=1" (to check the figures on another seed)')
    ap.add_argument("--skip-centralised", action="store_true")
    args = ap.parse_args()
    quiet_libraries()
    # Seeded noise (labelled as such in metrics.json) so a figure can be rerun bitwise; --run-config may override.
    flat = simulation_config(args.preset, ["dp-noise='seeded'", *(args.run_config or [])], f"{args.out}/dp")
    t = time.perf_counter()
    dp = simulate(flat, overwrite=True)  # a benchmark's folder is scratch
    wall = time.perf_counter() - t
    nodp = simulate({**flat, "dp": False, "out-dir": f"{args.out}/nodp"}, overwrite=True)
    acc_dp = dp["rounds"][-1]["global"]["accuracy"]
    acc_nodp = nodp["rounds"][-1]["global"]["accuracy"]
    cfg = from_run_config(flat)
    cent = float("nan")
    if not args.skip_centralised:
        torch.set_num_threads(2)
        epochs = cfg.federation.num_rounds * cfg.train.local_epochs
        if cfg.train.local_steps:  # the same share of each note's passes as the federated run
            epochs = max(1, round(cfg.federation.num_rounds * cfg.train.local_steps * cfg.train.batch_size
                                  / cfg.data.notes_per_site))
        cent = train_centralised(from_run_config({**flat, "dp": False}), epochs=epochs)["accuracy"]
    sites_per_round = [len([s for s in r["sites"].values() if "epsilon" in s]) for r in dp["rounds"][1:]]
    per_site_round = sum(r["bytes_up"] for r in dp["rounds"][1:]) / max(1, sum(sites_per_round))
    frac = per_site_round / dp["full_model_bytes"]
    eps = max(m["epsilon"] for m in dp["rounds"][-1]["sites"].values() if "epsilon" in m)
    print(f"preset={args.preset} sites={cfg.federation.num_sites} rounds={cfg.federation.num_rounds} "
          f"model={cfg.model.name} precision={dp['precision']} dp_noise={cfg.privacy.noise} "
          f"target_eps={cfg.privacy.target_epsilon} max_site_eps={eps:.3f}")
    print(f"acc_dp={acc_dp:.4f} acc_nodp={acc_nodp:.4f} acc_centralised_nonprivate={cent:.4f} "
          f"wall_s_nodp={nodp['wall_s']:.1f}")
    print(f"bytes_up_per_site_round={per_site_round:.0f} full_model_bytes={dp['full_model_bytes']}")
    print(f"wall_s={wall:.1f} dp_vs_nodp_acc_ratio={acc_dp / acc_nodp:.3f} bytes_fraction={frac:.5f}")


if __name__ == "__main__":
    main()
