"""Where the generative preset's DP / no-DP gap comes from: the same federation (in one process,
``fedpeft.inprocess``) in four arms that add DP-SGD's parts one at a time.

- ``nodp``: shuffled epochs, no clipping, no noise (the preset with ``dp=false``);
- ``poisson``: the DP path (Opacus, Poisson batches) with sigma = 0 and C = 1e9: nothing clipped;
- ``clip``: the DP path with sigma = 0 and the preset's C: clipped, no noise;
- ``dp``: the preset as it runs (epsilon = 8 per site).

The ``poisson`` and ``clip`` arms are ablations that carry no privacy: they replace the calibrated
(sigma, C) after planning and switch the budget check off, in this process only. Noise is seeded
(a simulation convenience), so every arm sees the same data and, where it draws them, the same
Poisson batches. Each final adapter is scored on ``--rescore`` held-out referrals (answer accuracy
from greedy generation, and the token-level held-out loss).

Last line: nodp=<acc> poisson=<acc> clip=<acc> dp=<acc> (answer accuracy on the held-out referrals)
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

from fedpeft import factory, site
from fedpeft.cli import simulation_config
from fedpeft.data.sites import global_test_examples
from fedpeft.inprocess import run_federation
from fedpeft.models import cpu_has_native_bfloat16
from fedpeft.privacy.accountant import PrivacyState
from fedpeft.runconfig import from_run_config
from fedpeft.runtime import quiet_libraries

ARMS = ("nodp", "poisson", "clip", "dp")


def ablate(arm: str) -> None:
    """Make the planned privacy state of every site the arm's (sigma, C); off for ``dp``/``nodp``."""
    if arm not in ("poisson", "clip"):
        return
    planned = site.privacy_plan

    def plan(cfg, n, js):  # type: ignore[no-untyped-def]
        state = planned(cfg, n, js)
        return dataclasses.replace(state, noise_multiplier=0.0,
                                   max_grad_norm=1e9 if arm == "poisson" else state.max_grad_norm)

    site.privacy_plan = plan  # type: ignore[assignment]
    PrivacyState.check_budget = lambda self, steps: None  # type: ignore[method-assign]  # sigma = 0: epsilon is infinite
    PrivacyState.epsilon = lambda self: float("inf")  # type: ignore[method-assign]


def run_arm(arm: str, preset: str, overrides: list[str], n: int) -> dict[str, float]:
    ablate(arm)
    with tempfile.TemporaryDirectory(prefix="gen-dp-ablation-") as out:  # the loop keeps no ledger: scratch only
        return _run(simulation_config(preset, ["dp-noise='seeded'", f"dp={arm != 'nodp'}".lower(), *overrides],
                                           out), n)


def _run(flat: dict, n: int) -> dict[str, float]:
    cfg = from_run_config(flat)
    t = time.perf_counter()
    glob, rounds = run_federation(cfg)
    scored = from_run_config({**flat, "global-test-size": n, "eval-generations": n})
    test = factory.dataset(scored, *global_test_examples(scored.data, seed=scored.train.seed,
                                                         num_sites=scored.federation.num_sites, task=scored.model.task))
    m = factory.evaluate(scored, factory.Scorer(scored)(glob), test)
    return {"accuracy": m["accuracy"], "loss": m["loss"], "seconds": time.perf_counter() - t,
            "preset_test": rounds[-1].accuracy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="clinical-gen")
    ap.add_argument("--run-config", action="append", default=[], help="overrides for every arm, e.g. \"seed=1\"")
    ap.add_argument("--rescore", type=int, default=256, help="held-out referrals each final adapter is scored on")
    ap.add_argument("--arm", choices=ARMS, help="one arm only (each arm patches this process: one per process)")
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(2)
    if args.arm:
        r = run_arm(args.arm, args.preset, args.run_config, args.rescore)
        print(f"arm={args.arm} answer_acc={r['accuracy']:.4f} heldout_loss={r['loss']:.3f} "
              f"answer_acc_preset_test={r['preset_test']:.4f} seconds={r['seconds']:.0f}", flush=True)
        return
    import subprocess
    import sys

    print(f"preset={args.preset} rescore_n={args.rescore} native_bf16={cpu_has_native_bfloat16()} "
          f"overrides={args.run_config}", flush=True)
    acc = {}
    for arm in ARMS:  # a process per arm: the ablations patch module state
        extra = [a for o in args.run_config for a in ("--run-config", o)]
        proc = subprocess.run([sys.executable, __file__, "--arm", arm, "--preset", args.preset, "--rescore",
                               str(args.rescore), *extra], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = proc.stdout.strip().splitlines()[-1]
        print(out, flush=True)
        acc[arm] = float(out.split("answer_acc=")[1].split()[0])
    print(" ".join(f"{a}={acc[a]:.4f}" for a in ARMS))


if __name__ == "__main__":
    main()
