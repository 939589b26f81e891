"""Frozen-prefix cache and length-split passes: the fast paths must give the slow paths' results."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft import adapters, models, prefix, training
from fedpeft.config import AdapterConfig, ModelConfig, PrivacyConfig
from fedpeft.privacy.accountant import new_privacy_state
from tests.conftest import CPU, NUM_LABELS


def _no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # same function with and without the fast path
    return model


def _tiny_top_lora(*, dp: bool, targets: str = "query,key,value") -> adapters.PeftModel:
    """LoRA on layer 1 only of the 2-layer tiny BERT: layer 0 is a cacheable frozen prefix (and with
    feed-forward targets, layer 1's attention block too)."""
    base = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=NUM_LABELS)
    torch.manual_seed(0)  # peft draws lora_A from the global generator
    model = adapters.create_adapter(base, AdapterConfig(rank=4, layers="1", target_modules=targets), dp=dp,
                                    base_name="tiny")
    with torch.no_grad():  # non-zero lora_B so the adapter changes the forward pass
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return _no_dropout(model)


def test_ffn_start_only_when_lora_adapts_the_feed_forward_block_alone():
    model = ModelConfig(name="tiny")
    assert prefix.ffn_start(model, AdapterConfig(layers="1", target_modules="intermediate.dense"))
    assert not prefix.ffn_start(model, AdapterConfig(layers="1", target_modules="query,intermediate.dense"))
    assert not prefix.ffn_start(model, AdapterConfig(layers="", target_modules="intermediate.dense"))
    assert not prefix.ffn_start(model, AdapterConfig(layers="1", target_modules="intermediate.dense", method="ia3"))


@pytest.mark.parametrize("targets", ["query,key,value", "intermediate.dense"])
@pytest.mark.parametrize("dp", [False, True])
def test_ffn_cache_gives_the_same_forward_and_training_step(tiny_dataset, fast_train, dp_on, dp, targets, device):
    """Cached attention output + feed-forward only == the full model, forward and one (DP) step."""
    # Prepare
    ffn = targets == "intermediate.dense"
    privacy = dp_on if dp else PrivacyConfig(enabled=False)
    train = dataclasses.replace(fast_train, batch_size=len(tiny_dataset), optimizer="sgd", lr=0.5)
    model = _tiny_top_lora(dp=False, targets=targets).to(device).eval()
    cached = prefix.compute_prefix(model.base_model.model, tiny_dataset, start_layer=1, ffn_start=ffn)
    ids, mask, _ = (t.to(device) for t in tiny_dataset.tensors)
    # Execute: forward
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        fast = training.logits_of(model, cached.tensors[0].to(device), cached.tensors[1].to(device),
                                  **prefix.start_of(cached))
    # Execute: one step on each path (same Poisson sample and noise under DP)
    results = []
    for data, physical in ((tiny_dataset, 10_000), (cached, 17)):
        m = _tiny_top_lora(dp=dp, targets=targets)
        state = new_privacy_state(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=0.5, sample_rate=1.0,
                                  planned_steps=1) if dp else None
        training.train_local(m, data, train=dataclasses.replace(train, max_physical_batch_size=physical),
                             privacy=privacy, privacy_state=state, device=device, seed=4, noise_seed=4)
        results.append(adapters.get_adapter_state(m))
    # Assert
    assert cached.ffn_start is ffn
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    start = adapters.get_adapter_state(_tiny_top_lora(dp=False, targets=targets))
    assert any(not torch.equal(results[0][k], v) for k, v in start.items())
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-5, msg=k)


def test_prefix_start_only_when_everything_below_is_frozen():
    mean = ModelConfig(name="tiny")
    assert prefix.prefix_start(mean, AdapterConfig(layers="4,5")) == 4
    assert prefix.prefix_start(mean, AdapterConfig(layers="")) == 0  # all layers adapted
    # BitFit and IA3 adapt only lora-layers (a peft target regex): the layers below are frozen
    assert prefix.prefix_start(mean, AdapterConfig(method="bitfit", layers="4,5")) == 4
    assert prefix.prefix_start(mean, AdapterConfig(method="prompt", layers="4,5")) == 0  # virtual tokens at layer 0
    assert prefix.prefix_start(ModelConfig(name="tiny", pooling="cls", head_init="random"),
                               AdapterConfig(layers="1")) == 0


def test_cached_prefix_forward_equals_full_forward(tiny_dataset, device):
    # Prepare
    model = _tiny_top_lora(dp=False).to(device).eval()
    ids, mask, _ = (t.to(device) for t in tiny_dataset.tensors)
    # Execute
    cached = prefix.compute_prefix(model.base_model.model, tiny_dataset, start_layer=1, batch_size=5)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        fast = training.logits_of(model, cached.tensors[0].to(device), cached.tensors[1].to(device),
                                  **prefix.start_of(cached))
    # Assert: the cache holds layer 1's input for every note, in the dataset's order
    assert cached.start_layer == 1 and cached.tensors[0].shape == (*ids.shape, 32)
    assert cached.tensors[0].device.type == "cpu"  # kept in host memory, whatever computed it
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    ev_full = training.evaluate(model, tiny_dataset, device=device, num_labels=NUM_LABELS)
    ev_fast = training.evaluate(model, cached, device=device, num_labels=NUM_LABELS)
    assert ev_fast.accuracy == ev_full.accuracy
    assert ev_fast.loss == pytest.approx(ev_full.loss, rel=1e-5)


@pytest.mark.parametrize("dp", [False, True])
def test_split_passes_and_prefix_give_the_same_training_step(tiny_dataset, fast_train, dp_on, dp, device):
    """One logical batch as 1 pass over tokens == 3 length-sorted passes over the cached prefix
    (same Poisson sample, same seeded noise under DP): the split and the cache change speed, not maths."""
    # Prepare
    privacy = dp_on if dp else PrivacyConfig(enabled=False)
    train = dataclasses.replace(fast_train, batch_size=len(tiny_dataset), optimizer="sgd", lr=0.5)
    cached = prefix.compute_prefix(_tiny_top_lora(dp=False).base_model.model, tiny_dataset, start_layer=1)
    results = []
    for data, physical in ((tiny_dataset, 10_000), (cached, 17)):
        model = _tiny_top_lora(dp=dp)
        state = new_privacy_state(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=0.5, sample_rate=1.0,
                                  planned_steps=1) if dp else None
        # Execute
        training.train_local(model, data, train=dataclasses.replace(train, max_physical_batch_size=physical),
                             privacy=privacy, privacy_state=state, device=device, seed=4, noise_seed=4)
        results.append(adapters.get_adapter_state(model))
    # Assert: the step moved the adapter, identically on both paths
    moved = _tiny_top_lora(dp=False)
    assert any(not torch.equal(results[0][k], v) for k, v in adapters.get_adapter_state(moved).items())
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-5, msg=k)


def test_disk_cache_is_shared_between_processes_and_damage_is_recomputed(tmp_path, monkeypatch, tiny_dataset):
    # Prepare: one process computes and stores
    monkeypatch.setenv(prefix.CACHE_DIR_ENV, str(tmp_path))
    cached = prefix.compute_prefix(_tiny_top_lora(dp=False).base_model.model, tiny_dataset, start_layer=1)
    prefix.PrefixCache().put("k1", cached)
    # Execute: a fresh cache (another process) reads it back
    other = prefix.PrefixCache()
    got = other.get("k1")
    # Assert
    assert got is not None and got.start_layer == 1 and other.hits == 1
    for a, b in zip(got.tensors, cached.tensors):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file
    (tmp_path / "k1.safetensors").write_bytes(b"not safetensors")
    assert prefix.PrefixCache().get("k1") is None  # damaged: recomputed by the caller, never trusted


def test_bfloat16_prefix_is_half_the_bytes_and_close_to_float32(tiny_dataset):
    # Prepare
    model = _tiny_top_lora(dp=False).eval()
    # Execute
    exact = prefix.compute_prefix(model.base_model.model, tiny_dataset, start_layer=1)
    fast = prefix.compute_prefix(model.base_model.model, tiny_dataset, start_layer=1, precision="bfloat16")
    ev_exact = training.evaluate(model, exact, device=CPU, num_labels=NUM_LABELS)
    ev_fast = training.evaluate(model, fast, device=CPU, num_labels=NUM_LABELS, precision="bfloat16")
    # Assert: stored in bfloat16, within bfloat16's rounding (8 bits of mantissa) of float32
    assert fast.tensors[0].dtype == torch.bfloat16 and exact.tensors[0].dtype == torch.float32
    assert fast.tensors[0].element_size() * 2 == exact.tensors[0].element_size()
    err = (fast.tensors[0].float() - exact.tensors[0]).norm() / exact.tensors[0].norm()
    assert 0 < err < 2e-2
    assert ev_fast.loss == pytest.approx(ev_exact.loss, rel=5e-2)


def test_bfloat16_training_clips_float32_per_sample_gradients(tiny_dataset, fast_train, dp_on, monkeypatch, device):
    """Under autocast Opacus' samplers return bfloat16; the norms it clips by must be float32."""
    from opacus.optimizers import DPOptimizer

    # Prepare: record the dtype and clipped norm of every per-sample gradient Opacus clips
    seen: list[tuple[torch.dtype, float]] = []
    orig = DPOptimizer.clip_and_accumulate

    def spy(self):
        flat = torch.cat([g.reshape(len(g), -1) for g in self.grad_samples], dim=1)
        norms = flat.double().norm(dim=1)
        factor = (self.max_grad_norm / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0).double()
        seen.append((flat.dtype, float((norms * factor).max())))
        return orig(self)

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", spy)
    cached = prefix.compute_prefix(_tiny_top_lora(dp=False).base_model.model, tiny_dataset, start_layer=1,
                                   precision="bfloat16")
    model = _tiny_top_lora(dp=True)
    before = adapters.get_adapter_state(model)
    train = dataclasses.replace(fast_train, batch_size=len(tiny_dataset), max_physical_batch_size=7)
    state = new_privacy_state(target_epsilon=8.0, target_delta=1e-5, max_grad_norm=0.05, sample_rate=1.0,
                              planned_steps=2)
    # Execute
    res = training.train_local(model, cached, train=train, privacy=dp_on, privacy_state=state, device=device,
                               seed=3, precision="bfloat16")
    # Assert: every clipped pass saw float32 per-sample gradients within C (float64 check)
    assert seen and all(dtype == torch.float32 for dtype, _ in seen)
    assert max(n for _, n in seen) <= 0.05 * (1 + 1e-6)
    after = adapters.get_adapter_state(model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in after) and res.epsilon > 0


def test_autocast_falls_back_to_float32_on_gpus_without_bfloat16(monkeypatch):
    # Prepare: a pre-Ampere GPU (no bfloat16); torch.device("cuda") needs no GPU to exist
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    # Execute
    gpu = models.autocast(torch.device("cuda"), "bfloat16")
    cpu = models.autocast(torch.device("cpu"), "bfloat16")
    # Assert: no autocast on that GPU; the CPU still gets bfloat16 autocast
    assert not isinstance(gpu, torch.autocast)
    assert isinstance(cpu, torch.autocast) and cpu.fast_dtype == torch.bfloat16
