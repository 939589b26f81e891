"""The PEFT menu on the `hospitals` federation, with DP (eps=8 per site) and without, same seeds.

For each method: trainable parameters and their share of the model, bytes up per site per round,
final global accuracy with and without DP, the DP step time / non-DP step time (median of
interleaved repeats of 12 steps at batch 32, on the data the federation's sites train on: cached
frozen-prefix states for the layer-local methods), the round-time ratio too, and peak memory
(each arm in its own process).
Prefix tuning runs on causal LMs only (transformers' BERT takes no past key/values): its row
comes from the `tiny-gen` federation (a random tiny Llama: step ratio and sizes only, its
accuracy means nothing). Runs in process (fedpeft.inprocess: the sites' own code, no Ray), one
arm at a time; run it alone.

Writes runs/bench-peft-methods/results.json and methods.png (accuracy against bytes).
Last line: methods_under_dp=<n> worst_dp_step_ratio=<x> best_dp_acc=<y>
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["lora", "dora", "ia3", "bitfit", "bottleneck", "loreft", "prompt", "p-tuning", "prefix"]


def worker(preset: str, method: str, dp: bool, rounds: int | None) -> dict:
    import torch

    from fedpeft import adapters, factory
    from fedpeft.cli import simulation_config
    from fedpeft.inprocess import run_federation
    from fedpeft.runconfig import from_run_config
    from fedpeft.runtime import quiet_libraries

    quiet_libraries()
    over = [f"adapter='{method}'", f"dp={'true' if dp else 'false'}", "dp-noise='seeded'"]
    if rounds:
        over.append(f"num-server-rounds={rounds}")
    cfg = from_run_config(simulation_config(preset, over, "runs/bench-peft-methods/scratch"))
    model = factory.build_model(cfg, dp=dp)
    trainable = sum(p.numel() for n, p in model.named_parameters()
                    if p.requires_grad and adapters.HANDLE not in n)
    total = sum(p.numel() for n, p in model.named_parameters() if adapters.HANDLE not in n)
    t = time.perf_counter()
    glob, results = run_federation(cfg)
    return {"method": method, "dp": dp, "preset": preset, "rounds": cfg.federation.num_rounds,
            "trainable": trainable, "share": trainable / total,
            "bytes_up": adapters.state_bytes(glob),  # one site's delta: the adapter's exchanged tensors
            "accuracy": results[-1].accuracy, "accuracy_by_round": [r.accuracy for r in results],
            "round_s": [r.seconds for r in results[1:]], "wall_s": time.perf_counter() - t,
            "epsilon": max((m.get("epsilon", 0.0) for m in results[-1].sites.values()), default=0.0),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads()}


def step_times(preset: str, method: str, steps: int = 12, repeats: int = 3) -> dict:
    """Median seconds per step, DP and non-DP, interleaved in this one process."""
    import statistics

    import torch

    from fedpeft import factory, training
    from fedpeft.cli import simulation_config
    from fedpeft.config import PrivacyConfig, TrainConfig
    from fedpeft.data.sites import make_site
    from fedpeft.runconfig import from_run_config
    from fedpeft.runtime import quiet_libraries

    quiet_libraries()
    cfg = from_run_config(simulation_config(preset, [f"adapter='{method}'"], "runs/bench-peft-methods/scratch"))
    site = make_site(0, cfg.federation.num_sites, cfg.data, seed=cfg.train.seed, task=cfg.model.task)
    n = 32 * steps
    texts, labels = list(site.train_texts[:n]), list(site.train_labels[:n])
    data = factory.dataset(cfg, texts, labels, tuple(site.train_targets[:n]))
    train = TrainConfig(batch_size=32, local_epochs=1, lr=5e-3)
    task = factory.task_of(cfg.model)
    device = torch.device("cpu")

    def run(dp: bool) -> float:
        model = factory.build_model(cfg, dp=dp)
        privacy = PrivacyConfig(enabled=dp, noise="seeded")
        state = training.plan_privacy(num_examples=len(data), train=train, privacy=privacy, num_rounds=10) if dp else None
        t = time.perf_counter()
        res = training.train_local(model, data, train=train, privacy=privacy, privacy_state=state, device=device,
                                   seed=0, noise_seed=1 if dp else None, precision=cfg.model.precision, task=task)
        return (time.perf_counter() - t) / res.steps

    run(True), run(False)  # warm-up: lazy imports, allocator
    dp_s, nodp_s = [], []
    for _ in range(repeats):
        dp_s.append(run(True))
        nodp_s.append(run(False))
    return {"dp_step_s": statistics.median(dp_s), "nodp_step_s": statistics.median(nodp_s)}


def arm(preset: str, method: str, dp: bool, rounds: int | None) -> dict:
    """One arm in a fresh process, so its peak memory is its own."""
    cmd = [sys.executable, __file__, "--worker", preset, method, str(int(dp)), str(rounds or 0)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["preset"] != "hospitals":
            continue
        ax.scatter(r["bytes_up"], r["acc_nodp"], marker="o", color="tab:blue")
        ax.scatter(r["bytes_up"], r["acc_dp"], marker="s", color="tab:red")
        ax.annotate(r["method"], (r["bytes_up"], r["acc_dp"]), textcoords="offset points", xytext=(4, -10))
    ax.scatter([], [], marker="o", color="tab:blue", label="without DP")
    ax.scatter([], [], marker="s", color="tab:red", label="DP, eps=8 per site")
    ax.set_xscale("log")
    ax.set_xlabel("bytes up per site per round (float32 delta)")
    ax.set_ylabel("final global accuracy (hospitals)")
    ax.set_title("The PEFT menu under DP: accuracy against upload size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", nargs=4, metavar=("PRESET", "METHOD", "DP", "ROUNDS"))
    ap.add_argument("--steps-worker", nargs=2, metavar=("PRESET", "METHOD"))
    ap.add_argument("--rounds", type=int, default=0, help="server rounds (0: the preset's)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (prefix runs on tiny-gen)")
    ap.add_argument("--out", default="runs/bench-peft-methods")
    args = ap.parse_args()
    if args.steps_worker:
        print(json.dumps(step_times(*args.steps_worker)))
        return
    if args.worker:
        preset, method, dp, rounds = args.worker
        print(json.dumps(worker(preset, method, dp == "1", int(rounds) or None)))
        return
    from fedpeft.models import cpu_has_native_bfloat16

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("tiny-gen" if m == "prefix" else "hospitals", m) for m in args.methods.split(",")]
    rows = []
    for preset, method in jobs:
        dp, nodp = arm(preset, method, True, args.rounds or None), arm(preset, method, False, args.rounds or None)
        cmd = [sys.executable, __file__, "--steps-worker", preset, method]
        steps = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        later = slice(1, None) if len(dp["round_s"]) > 1 else slice(None)
        row = {"method": method, "preset": preset, "rounds": dp["rounds"], "trainable": dp["trainable"],
               "share_pct": 100 * dp["share"], "bytes_up": dp["bytes_up"], "acc_dp": dp["accuracy"],
               "acc_nodp": nodp["accuracy"], "epsilon": dp["epsilon"],
               "dp_step_ratio": steps["dp_step_s"] / steps["nodp_step_s"], **steps,
               "dp_round_ratio": sum(dp["round_s"][later]) / sum(nodp["round_s"][later]),
               "peak_rss_gib_dp": dp["peak_rss_gib"], "peak_rss_gib_nodp": nodp["peak_rss_gib"],
               "wall_s": dp["wall_s"] + nodp["wall_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "methods.png")
    print(f"native_bf16={cpu_has_native_bfloat16()} rounds={rows[0]['rounds']}")
    print("| method | federation | trainable | % of model | bytes up / site / round | acc DP (eps=8) | acc no DP "
          "| DP/non-DP step time | DP/non-DP round time | peak RSS DP (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        acc = (f"{r['acc_dp']:.4f} | {r['acc_nodp']:.4f}" if r["preset"] == "hospitals" else "n/a | n/a")
        print(f"| {r['method']} | {r['preset']} | {r['trainable']:,} | {r['share_pct']:.3f} | {r['bytes_up']:,} "
              f"| {acc} | {r['dp_step_ratio']:.3f} | {r['dp_round_ratio']:.3f} | {r['peak_rss_gib_dp']:.2f} |")
    dp_ok = [r for r in rows if r["epsilon"] > 0]
    hosp = [r for r in rows if r["preset"] == "hospitals"] or rows
    print(f"methods_under_dp={len(dp_ok)} worst_dp_step_ratio={max(r['dp_step_ratio'] for r in rows):.3f} "
          f"best_dp_acc={max(r['acc_dp'] for r in hosp):.4f}")


if __name__ == "__main__":
    main()
