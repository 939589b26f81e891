"""The last decoder layer at response positions only vs the whole last layer, per architecture: one
DP-SGD step (Opacus' per-sample hooks, batch 16 referrals) of LoRA r=2 on every projection of the top
layer, the layers below cached (as ``clinical-gen`` trains), on random models shaped like the
embedded SmolLM2's top (width 576, 9 query / 3 key heads, MLP 1536, 49,152-token vocabulary; 2
layers, the first frozen) in Llama's, Qwen2's, Mistral's and Gemma's layouts.

Each model is saved as a plain transformers folder (safetensors, its config and SmolLM2's tokenizer)
in a temp folder and named by its path (``model=<folder>``), as a user's local model is. Both arms run
in this process, after three untimed steps each, interleaved (``--repeats`` rounds of ``--steps``
steps each); the median step of each round, the best round of each arm.

Last line: response_only_speedup_min=<x> (the smallest ratio of whole-layer to response-only step time
over the four architectures)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral", "gemma")


def save_model(kind: str, folder: Path, seed: int = 0) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedpeft import llm

    tok = llm.load_tokenizer("tiny-llama")  # SmolLM2's tokenizer and chat template
    extra = {"head_dim": 64} if kind == "gemma" else {}  # Gemma's default is 256
    config = AutoConfig.for_model(kind, vocab_size=len(tok), hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                  max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
                                  eos_token_id=2, **extra)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def step_times(folder: Path, *, precision: str, steps: int, repeats: int) -> dict[bool, float]:
    from opacus import GradSampleModule

    from fedpeft import factory
    from fedpeft.data.instructions import generate_referrals
    from fedpeft.runconfig import from_run_config
    from fedpeft.tasks import task_of

    cfg = from_run_config({"task": "causal-lm", "model": str(folder), "data": "referrals", "lora-layers": "1",
                           "lora-rank": 2, "lora-target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                           "max-length": 128, "batch-size": 16, "precision": precision})
    task = task_of(cfg.model)
    assert task.prefix_start(cfg.model, cfg.adapter) == 1, "the layer below the adapter must be cached"
    net = factory.build_model(cfg, dp=True)
    prompts, labels, responses = generate_referrals(n=16, seed=3)
    batch = factory.dataset(cfg, prompts, labels, responses).tensors
    gsm = GradSampleModule(net, loss_reduction="mean")
    cpu, at = torch.device("cpu"), {"start_layer": 1}
    best: dict[bool, float] = {}
    try:
        for response_only in (True, False):  # warm-up, untimed: first use of each shape builds its kernels
            task.response_only = response_only
            for _ in range(3):
                gsm.zero_grad(set_to_none=True)
                task.per_example_loss(gsm, batch, device=cpu, start=at, precision=precision).mean().backward()
        for _ in range(repeats):
            for response_only in (True, False):
                task.response_only = response_only
                times = []
                for _ in range(steps):
                    gsm.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    task.per_example_loss(gsm, batch, device=cpu, start=at, precision=precision).mean().backward()
                    times.append(time.perf_counter() - t0)
                best[response_only] = min(best.get(response_only, float("inf")), statistics.median(times))
    finally:
        task.response_only = True
        gsm._close()
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="auto", help="auto | float32 | bfloat16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    from fedpeft import models
    from fedpeft.runtime import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = models.resolve_precision(args.precision, torch.device("cpu"))
    print(f"device=cpu threads={torch.get_num_threads()} precision={precision} "
          f"native_bf16={models.cpu_has_native_bfloat16()} steps={args.steps} repeats={args.repeats}", flush=True)
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-response-only-") as tmp:
        for kind in ARCHS:
            folder = Path(tmp) / kind
            save_model(kind, folder)
            best = step_times(folder, precision=precision, steps=args.steps, repeats=args.repeats)
            ratios[kind] = best[False] / best[True]
            print(f"{kind}: response-only {best[True] * 1e3:.1f} ms, whole last layer {best[False] * 1e3:.1f} ms, "
                  f"ratio {ratios[kind]:.2f}", flush=True)
    print(f"response_only_speedup_min={min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
