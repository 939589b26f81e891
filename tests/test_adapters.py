"""Adapter tensors: exactly the trainable ones, strict loading, PEFT-format round trip, DP effects."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedpeft import adapters, models, training
from fedpeft.config import AdapterConfig, ModelConfig, PrivacyConfig
from tests.conftest import CPU, NUM_LABELS, make_tiny_lora


def _logits(model, ds):
    ids, mask, _ = ds.tensors
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_adapter_state_is_exactly_the_trainable_tensors():
    # Prepare
    model = make_tiny_lora(rank=4)
    # Execute
    state = adapters.get_adapter_state(model)
    # Assert: LoRA A/B on query/key/value (the default) of 2 layers + classifier weight/bias; no frozen base weight
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in state.values()) == trainable
    assert len(state) == 2 * 3 * 2 + 2
    assert all(("lora_" in k) or ("classifier" in k) for k in state)
    assert not any(".default." in k for k in state)  # adapter name stripped
    assert adapters.state_bytes(state) == trainable * 4


def test_set_adapter_state_round_trip(tiny_dataset):
    # Prepare
    src, dst = make_tiny_lora(seed=0), make_tiny_lora(seed=0)
    state = adapters.get_adapter_state(src)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    adapters.set_adapter_state(src, state)
    # Execute
    adapters.set_adapter_state(dst, adapters.get_adapter_state(src))
    # Assert
    torch.testing.assert_close(_logits(src, tiny_dataset), _logits(dst, tiny_dataset), rtol=0, atol=0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop(next(iter(s))), "missing adapter keys"),
        (lambda s: s.__setitem__("base_model.model.bert.pooler.dense.weight", torch.zeros(32, 32)),
         "names a frozen base weight"),
        (lambda s: s.__setitem__(next(iter(s)), torch.zeros(3, 3)), r"shape \(3, 3\) != expected"),
        (lambda s: s.__setitem__(next(iter(s)), torch.full_like(next(iter(s.values())), float("nan"))), "NaN"),
    ],
)
def test_set_adapter_state_rejects_bad_states(mutate, message):
    model = make_tiny_lora()
    state = adapters.get_adapter_state(model)
    mutate(state)
    with pytest.raises(adapters.AdapterStateError, match=message):
        adapters.set_adapter_state(model, state)


def test_peft_format_round_trip_same_logits(tmp_path, tiny_dataset):
    # Prepare: a trained-looking adapter
    model = make_tiny_lora()
    adapters.set_adapter_state(model, {k: v + 0.05 * torch.randn_like(v)
                                       for k, v in adapters.get_adapter_state(model).items()})
    # Execute
    out = adapters.save_adapter(model, tmp_path / "adapter", metadata={"labels": ["a"]})
    base = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=NUM_LABELS)
    loaded = PeftModel.from_pretrained(base, str(out))
    # Assert
    assert (out / "adapter_model.safetensors").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["peft_type"] == "LORA"
    assert adapters.read_metadata(out) == {"labels": ["a"]}
    torch.testing.assert_close(_logits(loaded.eval(), tiny_dataset), _logits(model.eval(), tiny_dataset),
                               rtol=1e-6, atol=1e-6)


def test_every_method_of_the_menu_trains_under_dp_and_the_refusal_names_the_reason():
    from dataclasses import replace

    from fedpeft import methods

    # Assert: the whole menu is DP-capable (tests/test_peft_menu.py checks each against a brute-force loop)
    assert methods.METHODS.names() == sorted(["lora", "dora", "ia3", "bitfit", "prompt", "p-tuning", "prefix",
                                              "bottleneck", "loreft"])
    assert all(methods.adapter_method(m).dp_capable for m in methods.METHODS.names())
    # ... and a method registered as not capable is refused before any model is touched, with its reason
    methods.METHODS.add("lora", replace(methods.adapter_method("lora"), dp_capable=False, dp_reason="a test reason"))
    try:
        with pytest.raises(adapters.DPUnsupportedError, match="adapter='lora' with dp=true: a test reason"):
            make_tiny_lora(dp=True)
    finally:
        methods.METHODS.add("lora", replace(methods.adapter_method("lora"), dp_capable=True, dp_reason=""))


def test_bitfit_without_dp_trains_only_biases_and_head(tiny_dataset, fast_train, tmp_path):
    # Prepare
    model = make_tiny_lora(dp=False, method="bitfit")
    before = adapters.get_adapter_state(model)
    # Execute
    training.train_local(model, tiny_dataset, train=fast_train, privacy=PrivacyConfig(enabled=False),
                         privacy_state=None, device=CPU, seed=0)
    after = adapters.get_adapter_state(model)
    # Assert
    assert all(("beft_bias" in k) or ("classifier" in k) for k in after)
    assert all(not torch.equal(before[k], after[k]) for k in after)
    base = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=NUM_LABELS)
    loaded = PeftModel.from_pretrained(base, str(adapters.save_adapter(model, tmp_path / "bf")))
    torch.testing.assert_close(_logits(loaded.eval(), tiny_dataset), _logits(model.eval(), tiny_dataset),
                               rtol=1e-6, atol=1e-6)


def test_dp_training_leaves_base_bitwise_unchanged_and_moves_every_adapter_tensor(tiny_dataset, fast_train, dp_on,
                                                                                   device):
    # Prepare
    model = make_tiny_lora().to(device)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapters.get_adapter_state(model)
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=fast_train, privacy=dp_on, num_rounds=1)
    # Execute
    res = training.train_local(model, tiny_dataset, train=fast_train, privacy=dp_on, privacy_state=state,
                               device=device, seed=0)
    # Assert
    assert res.steps == state.planned_steps and 0 < res.epsilon <= dp_on.target_epsilon
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    after = adapters.get_adapter_state(model)
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert changed == list(after)
    # and the hooks are gone: a plain forward/backward afterwards leaves no grad_sample behind
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in model.parameters() if p.requires_grad)


def test_lora_options_reach_peft():
    base = models.load_base_model(ModelConfig(name="tiny"), num_labels=NUM_LABELS)
    cfg = AdapterConfig(rank=2, alpha=4, layers="1", use_rslora=True, target_modules="query,key,value")
    model = adapters.create_adapter(base, cfg, dp=True, base_name="tiny")
    keys = adapters.get_adapter_state(model)
    assert all(".layer.1." in k for k in keys if "lora_" in k)
    assert sum("lora_A" in k for k in keys) == 3
    pc = model.peft_config["default"]
    assert pc.r == 2 and pc.use_rslora and pc.lora_alpha == 4


def test_label_name_head_scores_each_template_at_the_temperature(tokenizer):
    """Oracle by hand: row c = T * e_c / |e_c|^2 and bias 0, so class c's logit on its own template is T."""
    # Prepare
    labels = ["cardiology", "neurology", "dermatology"]
    cfg = ModelConfig(name="tiny", seed=0, head_init="label-names", head_template="notes on {label}")
    model = models.load_base_model(cfg, num_labels=len(labels), labels=labels)
    enc = tokenizer([f"notes on {lab}" for lab in labels], padding=True, return_tensors="pt")
    # Execute
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    # Assert
    assert torch.allclose(torch.diagonal(logits), torch.full((3,), 20.0), atol=1e-4)
    assert torch.count_nonzero(model.classifier.bias) == 0
    random_head = models.load_base_model(ModelConfig(name="tiny", seed=0, head_init="random"),
                                         num_labels=len(labels), labels=labels)
    assert not torch.equal(random_head.classifier.weight, model.classifier.weight)


def test_label_name_head_is_the_same_bits_at_any_thread_count():
    """Every party computes the head itself from the label names: the server for the round-0
    adapter, a resumed run, the in-process reference. In float32 1,679 of its 2,688 values on the
    smoke preset's model came out 1 ULP apart at 1 and at 2 threads, and a seeded rerun drifted."""
    # Prepare
    from fedpeft.config import DataConfig

    data = DataConfig()
    cfg = ModelConfig(name="minilm", layers=1, seed=0)
    before = torch.get_num_threads()
    heads = []
    # Execute
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            heads.append(models.load_base_model(cfg, num_labels=len(data.label_list),
                                                labels=data.label_list).classifier.weight.detach())
    finally:
        torch.set_num_threads(before)
    # Assert: bit for bit (tolerance 0), and a real head (not all zeros)
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
    assert heads[0].abs().min() > 0


def test_label_name_head_needs_mean_pooling():
    with pytest.raises(ValueError, match="head-init='label-names' needs pooling='mean'"):
        models.load_base_model(ModelConfig(name="tiny", pooling="cls"), num_labels=2, labels=["a", "b"])


def test_label_name_head_on_minilm_is_a_zero_shot_classifier():
    """The embedded MiniLM with the label-name head, before any training, beats chance (1/7) by far."""
    # Prepare
    from fedpeft.config import DataConfig
    from fedpeft.data.sites import global_test_set

    data = DataConfig()
    texts, labels = global_test_set(data, seed=0)
    model = models.load_base_model(ModelConfig(name="minilm"), num_labels=len(data.label_list),
                                   labels=data.label_list)
    test = training.encode(texts[:120], labels[:120], models.load_tokenizer("minilm"), max_length=64)
    # Execute
    result = training.evaluate(model, test, device=CPU, num_labels=len(data.label_list))
    # Assert
    assert result.accuracy > 0.35
