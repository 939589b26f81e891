"""The generative preset (`clinical-gen`): wall time of the DP federation, the task metric (answer
accuracy from greedy generation) with DP vs without DP, the gain over the untuned base model
zero-shot on the same test set (the federation's round 0), and the ratio against centralised
non-private training on the union of the sites' data.

The preset scores 64 held-out referrals each round: one answer is 1.6 points, and an accuracy near
0.3 has a standard error of ~0.06, too coarse to tell a ratio of 0.8 from 0.9. So the final DP and
non-DP adapters and the base are then re-scored on ``--rescore`` held-out referrals (default 256,
the same for all three: a paired comparison), and the last line reports those.

Last line: wall_s=<s> dp_vs_nodp_metric_ratio=<x> gain_over_base=<points>
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedpeft import factory
from fedpeft.centralised import train_centralised
from fedpeft.checkpoint import checkpoint_dir
from fedpeft.cli import simulate, simulation_config
from fedpeft.models import cpu_has_native_bfloat16
from fedpeft.runconfig import from_run_config
from fedpeft.runtime import quiet_libraries


def rescore(flat: dict[str, Any], outs: dict[str, str], rounds: dict[str, int], n: int) -> dict[str, float]:
    """Answer accuracy of each run's adapter checkpoint (name -> out dir, round) on n held-out referrals."""
    from fedpeft.data.sites import global_test_examples

    cfg = from_run_config({**flat, "global-test-size": n, "eval-generations": n})
    test = factory.dataset(cfg, *global_test_examples(cfg.data, seed=cfg.train.seed, num_sites=cfg.federation.num_sites,
                                                      task=cfg.model.task))
    scorer = factory.Scorer(cfg)
    out = {}
    for name, folder in outs.items():
        state = scorer.from_saved(load_file(str(checkpoint_dir(Path(folder), rounds[name]) / "adapter_model.safetensors")))
        out[name] = factory.evaluate(cfg, scorer(state), test)["accuracy"]
    return out


def centralised(flat: dict[str, Any], n: int = 0) -> float:
    """Answer accuracy of one non-private adapter trained on the union of the sites' data for the
    federation's epochs (rounds x local epochs), on the preset's test set or on n held-out referrals."""
    torch.set_num_threads(2)
    over = {"global-test-size": n, "eval-generations": n} if n else {}
    cfg = from_run_config({**flat, "dp": False, **over})
    return train_centralised(cfg, epochs=cfg.federation.num_rounds * cfg.train.local_epochs)["accuracy"]


def report_rescored(flat: dict[str, Any], out: str, n: int, *, centralised_too: bool) -> tuple[float, float]:
    """Re-score the runs in ``out`` (and train the centralised arm) on n held-out referrals, print
    them, and return (DP / no-DP ratio, gain over the base in points)."""
    rounds = from_run_config(flat).federation.num_rounds
    acc = rescore(flat, {"dp": f"{out}/dp", "nodp": f"{out}/nodp", "base": f"{out}/dp"},
                  {"dp": rounds, "nodp": rounds, "base": 0}, n)
    if centralised_too:  # the pooled, non-private adapter on the same held-out referrals
        acc["centralised"] = centralised(flat, n)
    ratio = acc["dp"] / acc["nodp"] if acc["nodp"] else float("nan")
    gain = 100 * (acc["dp"] - acc["base"])
    cent = f" dp_vs_centralised_ratio={acc['dp'] / acc['centralised']:.3f}" if acc.get("centralised") else ""
    print(f"rescored_n={n} " + " ".join(f"answer_acc_{k}={v:.4f}" for k, v in acc.items()))
    print(f"rescored_dp_vs_nodp_metric_ratio={ratio:.3f} rescored_gain_over_base={gain:.1f}{cent}")
    return ratio, gain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="clinical-gen")
    ap.add_argument("--out", default="runs/bench-genfed")
    ap.add_argument("--run-config", action="append", default=None, help='overrides, e.g. "precision=\'float32\'"')
    ap.add_argument("--skip-centralised", action="store_true")
    ap.add_argument("--rescore", type=int, default=256, help="held-out referrals for the final comparison (0: off)")
    ap.add_argument("--rescore-only", action="store_true", help="re-score the runs already in --out; run nothing")
    args = ap.parse_args()
    quiet_libraries()
    # Seeded noise (labelled as such in metrics.json) so a figure can be rerun bitwise.
    flat = simulation_config(args.preset, ["dp-noise='seeded'", *(args.run_config or [])], f"{args.out}/dp")
    if args.rescore_only:
        report_rescored(flat, args.out, args.rescore, centralised_too=not args.skip_centralised)
        return
    t = time.perf_counter()
    dp = simulate(flat, overwrite=True)  # a benchmark's folder is scratch
    wall = time.perf_counter() - t
    nodp = simulate({**flat, "dp": False, "out-dir": f"{args.out}/nodp"}, overwrite=True)
    m_dp = dp["rounds"][-1]["global"]["accuracy"]
    m_nodp = nodp["rounds"][-1]["global"]["accuracy"]
    base = dp["rounds"][0]["global"]["accuracy"]  # round 0: the untuned base (LoRA B = 0), same test set
    cfg = from_run_config(flat)
    cent = float("nan")
    if not args.skip_centralised and not args.rescore:  # with re-scoring: on the same referrals, below
        cent = centralised(flat)
    eps = max(m["epsilon"] for m in dp["rounds"][-1]["sites"].values() if "epsilon" in m)
    print(f"preset={args.preset} sites={cfg.federation.num_sites} rounds={cfg.federation.num_rounds} "
          f"model={cfg.model.name} precision={dp['precision']} native_bf16={cpu_has_native_bfloat16()} "
          f"dp_noise={cfg.privacy.noise} target_eps={cfg.privacy.target_epsilon} max_site_eps={eps:.3f}")
    print(f"answer_acc_dp={m_dp:.4f} answer_acc_nodp={m_nodp:.4f} answer_acc_base_zero_shot={base:.4f} "
          f"answer_acc_centralised_nonprivate={cent:.4f} perplexity_dp={dp['rounds'][-1]['global']['perplexity']:.3f} "
          f"wall_s_nodp={nodp['wall_s']:.1f} dp_vs_centralised_ratio={m_dp / cent if cent else float('nan'):.3f}")
    ratio = m_dp / m_nodp if m_nodp else float("nan")
    gain = 100 * (m_dp - base)
    if args.rescore:
        print(f"preset_test_n={cfg.model.eval_generations} dp_vs_nodp_metric_ratio_preset={ratio:.3f} "
              f"gain_over_base_preset={gain:.1f}")
        ratio, gain = report_rescored(flat, args.out, args.rescore, centralised_too=not args.skip_centralised)
    print(f"wall_s={wall:.1f} dp_vs_nodp_metric_ratio={ratio:.3f} gain_over_base={gain:.1f}")


if __name__ == "__main__":
    main()
