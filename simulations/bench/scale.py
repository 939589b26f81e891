"""The `devices` preset at growing numbers of virtual sites, a fixed number sampled per round.

Each size runs in its own process (its own Ray, its own peak RSS: this process and all its
children, Ray workers included, sampled every 0.5 s). Seconds per round are the steady rounds
(round 1, when the workers load the model, is reported apart). Site setup (data generation,
sigma calibration, ledger key) is timed directly for sampled sites of the largest size.

Last line: sites=<largest> peak_rss_gib=<x> round_s_ratio_100k_vs_1k=<largest vs smallest>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def _tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def one_size(sites: int, sampled: int, rounds: int, out: str, precision: str = "auto") -> dict[str, float]:
    """Run the preset at ``sites`` sites in this process; return its figures."""
    from fedpeft.cli import simulate, simulation_config
    from fedpeft.runtime import quiet_libraries

    quiet_libraries()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss())
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    flat = simulation_config("devices", [f"num-sites={sites} num-server-rounds={rounds} sites-per-round={sampled} "
                                         f"precision='{precision}'"], out)
    t = time.perf_counter()
    metrics = simulate(flat, overwrite=True)  # a benchmark's folder is scratch
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    r = metrics["rounds"]
    elapsed = [x["elapsed_s"] for x in r]
    per_round = [b - a for a, b in zip(elapsed, elapsed[1:])]
    trained = [len([s for s in x["sites"].values() if "epsilon" in s]) for x in r[1:]]
    return {"sites": sites, "peak_rss_gib": peak[0] / 2**30, "round1_s": per_round[0],
            "round_s": statistics.mean(per_round[1:]) if len(per_round) > 1 else per_round[0],
            "wall_s": wall, "trained_per_round": trained, "final_acc": r[-1]["global"]["accuracy"]}


def setup_costs(sites: int, probes: int = 20) -> dict[str, float]:
    """Milliseconds to set up a sampled site from nothing: data generated from (seed, site), sigma
    calibrated (first plan of its kind vs one shared through the run's memo), ledger key created."""
    import random
    import warnings

    from fedpeft.cli import simulation_config
    from fedpeft.data.sites import make_site, simulated_site
    from fedpeft.privacy import accountant
    from fedpeft.privacy.vault import SiteVault
    from fedpeft.runconfig import from_run_config
    from fedpeft.site import privacy_plan

    cfg = from_run_config(simulation_config("devices", [f"num-sites={sites}"], None))
    data_ms, sigma_ms, key_ms = [], [], []
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # Opacus' search, at eps=8
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[accountant.SIGMA_CACHE_ENV] = tmp
        for pid in random.Random(0).sample(range(sites), probes):
            t0 = time.perf_counter()
            site = simulated_site(pid, sites, cfg.data, seed=cfg.train.seed)
            d = make_site(site, sites, cfg.data, seed=cfg.train.seed)
            t1 = time.perf_counter()
            accountant.calibrate_noise.cache_clear()  # a fresh worker: only the shared memo helps
            privacy_plan(cfg, len(d.train_texts), None)
            t2 = time.perf_counter()
            SiteVault(Path(tmp) / f"site-{site}", site).public_key()
            t3 = time.perf_counter()
            data_ms.append(1e3 * (t1 - t0))
            sigma_ms.append(1e3 * (t2 - t1))
            key_ms.append(1e3 * (t3 - t2))
        plans = len(list(Path(tmp).glob("sigma-*.json")))
    return {"data_ms": statistics.median(data_ms), "sigma_ms": statistics.median(sigma_ms),
            "sigma_first_ms": max(sigma_ms), "key_ms": statistics.median(key_ms), "plans": plans, "probes": probes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", default="1000,10000,100000", help="comma-separated sizes, smallest first")
    ap.add_argument("--sampled", type=int, default=20, help="sites sampled per round (sites-per-round)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/bench-scale")
    ap.add_argument("--precision", default="auto", help="auto (bfloat16 where native), float32 or bfloat16")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_size(args.one, args.sampled, args.rounds, f"{args.out}-{args.one}",
                                              args.precision)))
        return
    sizes = [int(x) for x in args.sites.split(",")]
    results = []
    for n in sizes:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--sampled", str(args.sampled),
                               "--rounds", str(args.rounds), "--out", args.out, "--precision", args.precision],
                              capture_output=True, text=True, check=False)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"sites={n}: the run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(line[-1][len("RESULT "):])
        results.append(res)
        print(f"sites={n} peak_rss_gib={res['peak_rss_gib']:.2f} round_s={res['round_s']:.2f} "
              f"round1_s={res['round1_s']:.1f} trained_per_round={res['trained_per_round']} "
              f"final_acc={res['final_acc']:.4f} wall_s={res['wall_s']:.1f}", flush=True)
    cost = setup_costs(sizes[-1])
    print(f"site_setup at {sizes[-1]} sites ({cost['probes']} sampled sites): data_ms={cost['data_ms']:.1f} "
          f"sigma_ms={cost['sigma_ms']:.1f} (first of a plan: {cost['sigma_first_ms']:.0f} ms; "
          f"{cost['plans']} distinct plans) key_ms={cost['key_ms']:.1f}")
    big, small = results[-1], results[0]
    print(f"sites={big['sites']} peak_rss_gib={big['peak_rss_gib']:.2f} "
          f"round_s_ratio_100k_vs_1k={big['round_s'] / small['round_s']:.2f}")


if __name__ == "__main__":
    main()
