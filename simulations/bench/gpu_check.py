"""See fedpeft's site side work on a GPU: the device-parametrised contract tests on CUDA, then a
short DP federation of the `smoke` preset in one process on the GPU.

Runs without Flower or Ray (so the GPU kit in ../shared/gpu is enough):
    python simulations/bench/gpu_check.py
Last line: device=<name> cuda_tests=<passed>/<collected> smoke_acc=<x> peak_gib=<y> wall_s=<z>
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from fedpeft import models
from fedpeft.cli import load_preset
from fedpeft.inprocess import run_federation
from fedpeft.runconfig import from_run_config, parse_overrides
from fedpeft.runtime import quiet_libraries

# The contract tests that take a `device`; their CUDA cases carry "cuda" in their ids.
DEVICE_TESTS = ["tests/test_dp_step.py", "tests/test_adapters.py", "tests/test_prefix.py", "tests/test_device.py",
                "tests/test_site.py"]


def run_cuda_tests() -> tuple[int, int]:
    """(passed, collected) of the CUDA-parametrised tests, run in a child pytest."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider",
                          *DEVICE_TESTS], capture_output=True, text=True)
    print(out.stdout[-3000:], out.stderr[-2000:], sep="\n")
    passed = collected = 0
    for word, count in zip(out.stdout.split()[1:], out.stdout.split()):
        if word.startswith("passed"):
            passed = int(count)
        if word.startswith(("passed", "failed", "error")):
            collected += int(count)
    return passed, collected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--run-config", action="append", default=None)
    args = ap.parse_args()
    quiet_libraries()
    device = models.select_device()
    if device.type != "cuda":
        print("no CUDA device: the checks below run on the CPU")
    passed, collected = (0, 0) if args.skip_tests else run_cuda_tests()
    cfg = from_run_config({**load_preset("smoke"), **parse_overrides(args.run_config)})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, rounds = run_federation(cfg)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    eps = max(m["epsilon"] for m in rounds[-1].sites.values())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"precision={models.resolve_precision(cfg.model.precision, device)} "
          f"accuracy_by_round={[round(r.accuracy, 3) for r in rounds]} max_site_eps={eps:.3f}")
    print(f"device={name.replace(' ', '_')} cuda_tests={passed}/{collected} smoke_acc={rounds[-1].accuracy:.4f} "
          f"peak_gib={peak:.2f} wall_s={wall:.1f}")


if __name__ == "__main__":
    main()
