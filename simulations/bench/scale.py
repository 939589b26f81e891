"""The `devices` preset with 1,000 virtual sites (a fraction sampled per round) on this machine.

Peak RSS is summed over this process and all its children (Ray workers), sampled every 0.5 s.
Last line: sites=<n> peak_rss_gib=<x> s_per_round=<y>
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil

from fedpeft.cli import simulate, simulation_config
from fedpeft.runtime import quiet_libraries


def _tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--out", default="runs/bench-scale")
    args = ap.parse_args()
    quiet_libraries()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_rss())
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    flat = simulation_config("devices", [f"num-sites={args.sites} num-server-rounds={args.rounds} "
                                         f"fraction-train={args.fraction} fraction-evaluate={args.fraction}"], args.out)
    t = time.perf_counter()
    metrics = simulate(flat, overwrite=True)  # a benchmark's folder is scratch
    wall = time.perf_counter() - t
    stop.set()
    th.join()
    r = metrics["rounds"]
    sampled = [len([s for s in x["sites"].values() if "epsilon" in s]) for x in r[1:]]
    print(f"rounds={args.rounds} sites_trained_per_round={sampled} final_acc={r[-1]['global']['accuracy']:.4f} "
          f"wall_s={wall:.1f}")
    print(f"sites={args.sites} peak_rss_gib={peak[0] / 2**30:.2f} s_per_round={metrics['wall_s'] / args.rounds:.1f}")


if __name__ == "__main__":
    main()
