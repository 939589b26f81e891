"""DP-SGD vs non-DP step time for the generative task: SmolLM2-135M-Instruct + LoRA, batch 16,
sequence 128, in the default precision (bfloat16 where the CPU computes it natively, else
float32), through fedpeft's training loop (response-only logits; the frozen prefix cached when
LoRA sits on the top layers, as in `clinical-gen`), with its default pass size (a whole batch of
16 in one pass, in both arms). Both arms run in this process, interleaved. Peak memory: each arm
once more in a fresh child process.

The ratio is per expected step: DP-SGD's batches are Poisson draws (16 examples on average, but a
draw of 20 does 25 % more work), so the DP arm's seconds per drawn example times 16 are divided by
the non-DP arm's seconds per step (exactly 16 examples), repeat by repeat, and the median of those
paired ratios is reported. Without that the figure carries the draw's noise (a few percent over 18
steps); the raw ratio of median step times is printed too.

Steady state, not first use: with bfloat16 on a CPU, oneDNN compiles a kernel for each new matrix
shape on first use (~2-15 ms each, as long as the product itself). The non-DP arm's batches always
hold 16 notes; DP-SGD's Poisson batches bring a new batch size now and then for the first few dozen
steps, which a run of hundreds of steps amortises. So both arms first run ``--warmup`` steps (the
same number), and the ratio of that first, cold call pair is printed as ``cold_ratio``. (The count of
response tokens, new at almost every step in both arms of a real run, is padded to a multiple of 16
by ``fedpeft.tasks.causal_lm.head_rows``.)

Last line: gen_dp_overhead_ratio=<x> peak_rss_gib=<y>   (y: the DP arm's peak resident memory; the line
before gives each arm's peak and what its training added on top of the loaded model and data)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch


def setup(layers: str, steps: int, precision: str = "auto"):
    from fedpeft import factory
    from fedpeft.data.instructions import QUESTION, SYSTEM, chat, referral_response
    from fedpeft.data.notes import notes_with_findings
    from fedpeft.runconfig import from_run_config

    flat = {"task": "causal-lm", "model": "smollm2", "data": "referrals", "lora-layers": layers,
            "lora-target-modules": "q_proj,v_proj", "max-length": 128, "batch-size": 16, "lr": 0.002,
            "adapter-lr-scale": 1.0, "precision": precision}
    cfg = from_run_config(flat)
    n = 16 * steps
    notes, labels, findings = notes_with_findings(n=6 * n, seed=0)
    # six notes per referral: every prompt is longer than 128 tokens, so every row is cut to exactly 128
    prompts = [chat("Referral note: " + " ".join(notes[6 * i:6 * i + 6]) + f"\n{QUESTION}", SYSTEM) for i in range(n)]
    responses = [referral_response(labels[6 * i], findings[6 * i]) for i in range(n)]
    data = factory.dataset(cfg, prompts, labels[::6], responses)
    lengths = data.tensors[1].sum(1)
    assert int(lengths.min()) == 128, f"rows must fill the 128 tokens: {lengths.tolist()}"
    return cfg, data


def step_time(cfg, data, dp: bool) -> tuple[float, float]:
    """(seconds per step, seconds per drawn example) of one call of fedpeft's training loop."""
    import dataclasses

    from fedpeft import factory, models, training
    from fedpeft.tasks import task_of

    privacy = dataclasses.replace(cfg.privacy, enabled=dp)
    model = factory.worker_model(dataclasses.replace(cfg, privacy=privacy), factory.initial_adapter_state(cfg))
    state = training.plan_privacy(num_examples=len(data), train=cfg.train, privacy=privacy, num_rounds=50) if dp else None
    t = time.perf_counter()
    res = training.train_local(model, data, train=cfg.train, privacy=privacy, privacy_state=state,
                               device=models.select_device(), seed=0, precision=cfg.model.precision,
                               task=task_of(cfg.model))
    seconds = time.perf_counter() - t
    return seconds / res.steps, seconds / max(res.drawn, 1)


def child(arm: str, layers: str, steps: int, precision: str) -> None:
    """One arm in a fresh process: its peak resident memory, and how much of it training added
    (sampled every 10 ms while it trains; the model and the cached prefix are there before)."""
    import threading

    import psutil

    cfg, data = setup(layers, steps, precision)
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    step_time(cfg, data, arm == "dp")
    done.set()
    thread.join()
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "training_gib": (peak[0] - before) / 2**30}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", help="auto (bfloat16 where native, else float32) or float32")
    ap.add_argument("--warmup", type=int, default=60, help="steps per arm before timing (kernels for new shapes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="28,29", help="LoRA layers ('' = all 30: a full forward every step)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fedpeft.runtime import quiet_libraries

    quiet_libraries()
    if args.child:
        child(args.child, args.layers, args.steps, args.precision)
        return
    from fedpeft import models

    cfg, data = setup(args.layers, args.steps, args.precision)
    (cold_nodp, _), (_, cold_dp) = step_time(cfg, data, False), step_time(cfg, data, True)
    for _ in range(math.ceil(args.warmup / args.steps) - 1):
        step_time(cfg, data, False), step_time(cfg, data, True)
    nodp, dp = [], []
    for _ in range(args.repeats):
        nodp.append(step_time(cfg, data, False))
        dp.append(step_time(cfg, data, True))
    rss = {}
    for arm in ("nodp", "dp"):
        out = subprocess.run([sys.executable, __file__, "--child", arm, "--layers", args.layers, "--steps", "2",
                              "--threads", str(args.threads), "--precision", args.precision], capture_output=True, text=True, check=True)
        rss[arm] = json.loads(out.stdout.strip().splitlines()[-1])
    device = models.select_device()
    print(f"device={device} threads={args.threads} precision={models.resolve_precision(cfg.model.precision, device)} "
          f"native_bf16={models.cpu_has_native_bfloat16()} batch=16 seq=128 lora_layers={args.layers or 'all'} "
          f"steps={args.steps} repeats={args.repeats} warmup_steps={args.warmup}")
    med = statistics.median
    step_nodp, step_dp = med(t for t, _ in nodp), med(t for t, _ in dp)
    drawn_per_step = sum(t / e for t, e in dp) / len(dp)  # (s per step) / (s per example)
    # each repeat's DP call against the non-DP call just before it (this machine's speed drifts by
    # ~10 % between calls a minute apart), then the median over the pairs
    per_step = med(16 * e_dp / t_nodp for (_, e_dp), (t_nodp, _) in zip(dp, nodp))
    print(f"step_s_nodp={step_nodp:.4f} step_s_dp={step_dp:.4f} dp_examples_per_step={drawn_per_step:.2f} "
          f"raw_median_step_ratio={step_dp / step_nodp:.3f} cold_ratio={16 * cold_dp / cold_nodp:.3f} "
          f"peak_rss_gib_nodp={rss['nodp']['peak_rss_gib']:.2f} peak_rss_gib_dp={rss['dp']['peak_rss_gib']:.2f} "
          f"training_added_gib_nodp={rss['nodp']['training_gib']:.3f} training_added_gib_dp={rss['dp']['training_gib']:.3f}")
    print(f"gen_dp_overhead_ratio={per_step:.3f} peak_rss_gib={rss['dp']['peak_rss_gib']:.2f}")


if __name__ == "__main__":
    main()
