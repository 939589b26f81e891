"""DP-SGD vs non-DP local training time, MiniLM + LoRA r=8 on query/value, batch 32, seq 64.

Both arms run in this one process, interleaved, on the same data; we report the ratio of median
step times. Also: trainable parameters and adapter bytes as a fraction of the full model.
Last line: dp_overhead_ratio=<x> adapter_fraction=<y>
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import TensorDataset

from fedpeft import adapters, models, training
from fedpeft.config import AdapterConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedpeft.data.notes import generate_notes
from fedpeft.runtime import quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=12, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    device = models.select_device()
    batch, seq = 32, 64
    texts, labels = generate_notes(n=batch * args.steps, seed=0)
    tok = models.load_tokenizer("minilm")
    enc = tok(texts, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    data = TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))
    base = models.load_base_model(ModelConfig(name="minilm"), num_labels=7)
    full_bytes = models.model_bytes(base)
    train = TrainConfig(batch_size=batch, local_epochs=1, lr=5e-3)
    acfg = AdapterConfig(rank=8, target_modules="query,value", layers="")  # all 6 layers, as the issue asks

    def run(dp: bool) -> float:
        model = adapters.create_adapter(models.load_base_model(ModelConfig(name="minilm"), num_labels=7), acfg,
                                        dp=dp, base_name="minilm")
        privacy = PrivacyConfig(enabled=dp)
        state = training.plan_privacy(num_examples=len(data), train=train, privacy=privacy, num_rounds=10) if dp else None
        t = time.perf_counter()
        res = training.train_local(model, data, train=train, privacy=privacy, privacy_state=state, device=device, seed=0)
        return (time.perf_counter() - t) / res.steps

    run(False), run(True)  # warm-up: allocator, kernels, Opacus import
    nodp, dp = [], []
    for _ in range(args.repeats):
        nodp.append(run(False))
        dp.append(run(True))
    model = adapters.create_adapter(base, acfg, dp=True, base_name="minilm")
    state = adapters.get_adapter_state(model)
    ratio = statistics.median(dp) / statistics.median(nodp)
    frac = adapters.state_bytes(state) / full_bytes
    print(f"device={device} threads={args.threads} batch={batch} seq={seq} steps={args.steps} repeats={args.repeats}")
    print(f"step_s_nodp={statistics.median(nodp):.4f} step_s_dp={statistics.median(dp):.4f}")
    print(f"trainable_params={adapters.trainable_parameter_count(model)} adapter_bytes={adapters.state_bytes(state)} "
          f"full_model_bytes={full_bytes}")
    print(f"dp_overhead_ratio={ratio:.3f} adapter_fraction={frac:.5f}")


if __name__ == "__main__":
    main()
