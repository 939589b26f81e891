"""The PEFT menu under DP: every method's Opacus step against a brute-force per-example loop
(float64, sigma = 0), the prompt-tuning hazard, weights that move, merges, export round trips."""

from __future__ import annotations

import math

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedpeft import adapters, factory, models
from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.methods import METHODS, GradSampleError, check_grad_samples
from fedpeft.methods.inserted import insert_modules
from fedpeft.runconfig import ConfigError, from_run_config
from fedpeft.tasks import task_of
from tests.conftest import CPU

CLASSIFIER_METHODS = [m for m in METHODS.names() if m != "prefix"]  # prefix: causal LMs only (BERT takes no cache)
RTOL = 1e-10  # of each tensor's scale, float64


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the same function in the loop and in the batched step


def _perturbed(model: torch.nn.Module, seed: int = 0) -> list[torch.nn.Parameter]:
    """Trainable tensors moved off their init (B = 0, IA3 = 1, prompt = random) so every path carries gradient."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
    return params


def _clip_and_sum(grads: list[list[torch.Tensor]], clip: float) -> list[torch.Tensor]:
    """The brute-force oracle: each example's whole gradient clipped to ``clip``, then the mean."""
    out = [torch.zeros_like(g) for g in grads[0]]
    for g in grads:
        norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
        for acc, x in zip(out, g):
            acc.add_(x * min(1.0, clip / (norm + 1e-6)))
    return [o / len(grads) for o in out]


def _assert_close_to_scale(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0.0, atol=RTOL * scale)


def tiny_classifier(method: str, device: torch.device) -> torch.nn.Module:
    base = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=3)
    model = adapters.create_adapter(base, AdapterConfig(method=method, rank=4, layers="", virtual_tokens=4), dp=True,
                                    base_name="tiny", targets=["query", "value"])
    model = model.double().to(device).train()
    _no_dropout(model)
    return model


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_classifier_dp_step_equals_the_brute_force_clip_and_sum(method, device):
    # Prepare: 6 notes, one padded; every trainable tensor non-trivial
    torch.manual_seed(0)
    model = tiny_classifier(method, device)
    params = _perturbed(model)
    ids = torch.randint(100, 1000, (6, 12), device=device)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    y = torch.tensor([0, 1, 2, 0, 1, 2], device=device)
    ce = torch.nn.CrossEntropyLoss()
    brute = [list(torch.autograd.grad(ce(model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits,
                                         y[i:i + 1]), params, allow_unused=True)) for i in range(6)]
    brute = [[torch.zeros_like(p) if g is None else g for g, p in zip(row, params)] for row in brute]
    norms = [math.sqrt(sum(float(x.pow(2).sum()) for x in g)) for g in brute]
    clip = 0.5 * min(norms)  # below every norm: every example is clipped
    # Execute: one Opacus step on the batch, no noise
    hooks, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.0),
        data_loader=DataLoader(TensorDataset(ids, mask, y), batch_size=6), noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, wrap_model=False)
    ce(model(input_ids=ids, attention_mask=mask).logits, y).backward()
    check_grad_samples(params, 6)
    per_example = [p.grad_sample.clone() for p in params]
    opt.pre_step()
    hooks.cleanup()
    # Assert: each example's own gradient (never the batch's sum), and the clipped mean of the loop
    _assert_close_to_scale(per_example, [torch.stack([g[j] for g in brute]) for j in range(len(params))])
    _assert_close_to_scale([p.grad for p in params], _clip_and_sum(brute, clip))
    assert len(params) > 2  # the method's tensors and the head


@pytest.mark.parametrize("method,model_name,rtol", [
    *[(m, "tiny-gpt2", RTOL) for m in ("lora", "dora", "ia3", "prompt", "p-tuning", "prefix", "bottleneck", "loreft")],
    # peft's BEFT takes Linear layers only (GPT-2's are Conv1D). transformers' Llama keeps float32 in
    # RMSNorm and the rotary tables inside a float64 model: agreement to ~1e-7 of scale there.
    ("bitfit", "tiny-llama", 1e-5), ("prefix", "tiny-llama", 1e-5), ("dora", "tiny-llama", 1e-5),
])
def test_causal_lm_per_example_gradients_equal_the_loop(method, model_name, rtol):
    from opacus import GradSampleModule

    from fedpeft.data.instructions import generate_referrals

    # Prepare
    cfg = from_run_config({"task": "causal-lm", "model": model_name, "data": "referrals", "adapter": method,
                           "lora-layers": "", "virtual-tokens": 4, "max-length": 96})
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=True).double().train()
    _no_dropout(net)
    params = _perturbed(net)
    prompts, labels, responses = generate_referrals(n=5, seed=3)
    batch = task.encode(cfg.model, factory.Examples(prompts, labels, tuple(responses))).tensors
    brute = []
    for i in range(5):
        loss = task.per_example_loss(net, [t[i:i + 1] for t in batch], device=CPU, start={}, precision="float32")
        row = torch.autograd.grad(loss.sum(), params, allow_unused=True)
        brute.append([torch.zeros_like(p) if g is None else g for g, p in zip(row, params)])
    # Execute
    gsm = GradSampleModule(net, loss_reduction="mean")
    task.per_example_loss(net, batch, device=CPU, start={}, precision="float32").mean().backward()
    check_grad_samples(params, 5)
    got = [p.grad_sample.clone() for p in params]
    gsm._close()
    # Assert
    scale = max(float(torch.stack([g[j] for g in brute]).abs().max()) for j in range(len(params)))
    for j, g in enumerate(got):
        torch.testing.assert_close(g, torch.stack([row[j] for row in brute]), rtol=0.0, atol=rtol * scale)


def test_peft_prompt_tuning_as_shipped_gives_one_summed_row_and_is_refused():
    """The hazard: peft embeds the virtual tokens once and repeats them. Without fedpeft's
    per-example prompts Opacus sees one row for the whole batch; the training loop's check refuses it."""
    from peft import PromptTuningConfig, get_peft_model

    # Prepare: peft's own prompt tuning, its prompt the only trainable tensor (the silent case)
    base = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=3)
    plain = get_peft_model(base, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)).double().train()
    for name, p in plain.named_parameters():
        p.requires_grad_("prompt_encoder" in name)
    params = [p for p in plain.parameters() if p.requires_grad]
    ids = torch.randint(100, 1000, (5, 10))
    hooks, _, _ = PrivacyEngine().make_private(
        module=plain, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=DataLoader(TensorDataset(ids), batch_size=5),
        noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False, wrap_model=False)
    # Execute
    plain(input_ids=ids).logits.sum().backward()
    # Assert: one row, equal to the batch's summed gradient, and refused
    (p,) = params
    assert p.grad_sample.shape[0] == 1
    torch.testing.assert_close(p.grad_sample[0], p.grad, rtol=1e-12, atol=1e-15)
    with pytest.raises(GradSampleError, match="for a batch of 5"):
        check_grad_samples(params, 5)
    hooks.cleanup()


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_every_method_trains_under_dp_moves_its_tensors_and_leaves_the_base(method, tiny_dataset, dp_on, device):
    from fedpeft import training
    from fedpeft.config import TrainConfig

    # Prepare
    base = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=7)
    model = adapters.create_adapter(base, AdapterConfig(method=method, layers="", virtual_tokens=4), dp=True,
                                    base_name="tiny")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapters.get_adapter_state(model)
    train = TrainConfig(lr=1e-2, batch_size=8, local_epochs=1, seed=0)
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=train, privacy=dp_on, num_rounds=2)
    # Execute
    res = training.train_local(model, tiny_dataset, train=train, privacy=dp_on, privacy_state=state, device=device,
                               seed=1, noise_seed=7)
    after = adapters.get_adapter_state(model)
    # Assert: epsilon spent; every exchanged tensor moved; the frozen base bitwise unchanged
    assert 0 < res.epsilon <= dp_on.target_epsilon and res.steps == 6
    assert set(after) == set(before) and all(not torch.equal(after[k], before[k]) for k in after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach().cpu(), frozen[n].cpu()), n


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_export_round_trip_through_plain_peft_gives_the_same_logits(method, tmp_path):
    from peft import PeftModel

    # Prepare: a trained-looking adapter
    model = tiny_classifier(method, CPU).float().eval()
    _perturbed(model, seed=3)
    ids = torch.randint(100, 1000, (3, 9))
    want = model(input_ids=ids).logits
    # Execute: PEFT format, read back by peft alone onto a fresh base
    adapters.save_adapter(model, tmp_path / "a")
    fresh = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=3)
    insert_modules(fresh, AdapterConfig(method=method, rank=4, layers=""))  # bottleneck, loreft: their modules
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "a")).eval()
    # Assert
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    assert "fedpeft_dp_handle" not in str(list((tmp_path / "a").iterdir()))


@pytest.mark.parametrize("method", CLASSIFIER_METHODS)
def test_every_exchanged_tensor_is_one_trainable_parameter_for_the_audit_canaries(method):
    from fedpeft.privacy.audit.canaries import _param_name

    # Prepare
    model = tiny_classifier(method, CPU)
    named = dict(model.named_parameters())
    state = adapters.get_adapter_state(model)
    # Execute: the canaries' map from an exchanged key to the parameter whose per-example gradients they join
    found = {k: _param_name(k, named) for k in state}
    # Assert: one distinct trainable parameter per key, of the key's shape
    assert len(set(found.values())) == len(state)
    for k, n in found.items():
        assert named[n].requires_grad and tuple(named[n].shape) == tuple(state[k].shape), (k, n)


def test_exchanged_state_round_trips_and_refuses_a_wrong_shape():
    # Prepare: P-tuning exchanges its encoder (peft's saved state is the encoder's output)
    model = tiny_classifier("p-tuning", CPU)
    state = {k: v + 1.0 for k, v in adapters.get_adapter_state(model).items()}
    # Execute
    adapters.set_adapter_state(model, state)
    # Assert
    assert all(torch.equal(adapters.get_adapter_state(model)[k], v) for k, v in state.items())
    assert any("mlp_head" in k for k in state)
    key = next(iter(state))
    with pytest.raises(adapters.AdapterStateError, match="shape"):
        adapters.set_adapter_state(model, {**state, key: torch.zeros(2, 2, dtype=state[key].dtype)})


def test_fedavg_of_each_method_is_the_weighted_mean_of_its_tensors():
    from fedpeft.aggregation.fedavg import fedavg

    # Prepare: two sites' deltas of an IA3, a DoRA and a prompt adapter; weights 1 and 3
    for method in ("ia3", "dora", "prompt"):
        state = adapters.get_adapter_state(tiny_classifier(method, CPU))
        a = {k: torch.full_like(v, 2.0) for k, v in state.items()}
        b = {k: torch.full_like(v, -2.0) for k, v in state.items()}
        # Execute
        merged = fedavg([a, b], [1.0, 3.0])
        # Assert: (1*2 + 3*(-2)) / 4 = -1 everywhere (DoRA: m, B and A each averaged)
        assert set(merged) == set(state)
        assert all(torch.equal(v, torch.full_like(v, -1.0)) for v in merged.values())


def test_method_combinations_that_cannot_work_are_refused_naming_the_keys():
    with pytest.raises(ConfigError, match="adapter='prefix' with task='classification'"):
        from_run_config({"adapter": "prefix"})
    with pytest.raises(ConfigError, match="grad-sample-mode='ghost' with adapter='ia3'"):
        from_run_config({"adapter": "ia3", "grad-sample-mode": "ghost"})
    with pytest.raises(ConfigError, match="merge='svd' merges LoRA factors; adapter='dora'"):
        from_run_config({"adapter": "dora", "merge": "svd", "lora-ranks": "2,4"})
    with pytest.raises(ConfigError, match="virtual-tokens"):
        from_run_config({"adapter": "prompt", "virtual-tokens": 0})


def test_loreft_keeps_r_orthonormal_after_steps_and_after_a_merge():
    from fedpeft.aggregation.fedavg import fedavg
    from fedpeft.methods.inserted import LoReFT

    # Prepare: two sites' LoReFT states with different orthonormal R (their average is not orthonormal)
    model = tiny_classifier("loreft", CPU)
    state = adapters.get_adapter_state(model)
    keys = [k for k in state if k.endswith(".R")]
    assert keys
    gen = torch.Generator().manual_seed(1)
    sites = []
    for _ in range(2):
        s = dict(state)
        for k in keys:
            q, _ = torch.linalg.qr(torch.randn(state[k].shape[1], state[k].shape[0], generator=gen, dtype=torch.float64))
            s[k] = q.T.contiguous()
        sites.append(s)
    merged = fedavg(sites, [1.0, 1.0])
    eye = torch.eye(state[keys[0]].shape[0], dtype=torch.float64)
    assert not torch.allclose(merged[keys[0]] @ merged[keys[0]].T, eye, atol=1e-3)
    # Execute: the merged state loaded into a site's model (the rule: average, then project)
    adapters.set_adapter_state(model, merged)
    # Assert: rows orthonormal, spanning the same space the QR of the average gives; an orthonormal R
    # is left as it is by the projection
    for m in model.modules():
        if isinstance(m, LoReFT) and m.R.requires_grad:  # not peft's frozen original copy
            torch.testing.assert_close(m.R @ m.R.T, eye, rtol=0, atol=1e-12)
            before = m.R.detach().clone()
            m.fedpeft_after_step()
            torch.testing.assert_close(m.R, before, rtol=0, atol=1e-12)
    q, _ = torch.linalg.qr(merged[keys[0]].T)
    got = adapters.get_adapter_state(model)[keys[0]]
    torch.testing.assert_close(got.T @ got, q @ q.T, rtol=0, atol=1e-12)  # same row space


@pytest.mark.parametrize("method", ["bottleneck", "loreft", "lora"])
def test_adapter_tensors_train_at_the_adapter_rate_and_only_the_head_at_lr(method):
    from fedpeft import training
    from fedpeft.config import TrainConfig

    # Prepare: the inserted modules are peft modules_to_save, like the head, but they are adapter tensors
    model = tiny_classifier(method, CPU)
    head = {id(p) for n, p in model.named_parameters() if p.requires_grad and ".classifier." in n}
    # Execute
    opt = training._optimizer(model, TrainConfig(lr=0.1, adapter_lr_scale=0.01))
    # Assert: two groups, the head alone at lr, every other trainable tensor at lr x adapter-lr-scale
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert head and all(lrs[i] == 0.1 for i in head)
    rest = [lr for i, lr in lrs.items() if i not in head]
    assert rest and all(lr == pytest.approx(0.001, rel=1e-12) for lr in rest)


def test_inserted_methods_start_as_the_identity():
    # Prepare
    ids = torch.randint(100, 1000, (2, 7))
    plain = models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=3).double().eval()
    for method in ("bottleneck", "loreft"):
        # Execute: a fresh adapter (up = 0; W = R, b = 0) with the same head
        model = tiny_classifier(method, CPU).eval()
        # Assert: the base model's hidden states, unchanged
        want = plain.bert(input_ids=ids).last_hidden_state
        got = model.base_model.model.bert(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["dora", "ia3", "bitfit", "prompt", "p-tuning", "bottleneck", "loreft"])
def test_every_method_federates_with_dp_in_process(method):
    from fedpeft.inprocess import run_federation

    # Prepare: 2 tiny sites, 2 rounds, seeded noise (a simulation)
    cfg = from_run_config({"model": "tiny", "adapter": method, "lora-layers": "", "num-sites": 2,
                           "num-server-rounds": 2, "notes-per-site": 32, "test-per-site": 8, "global-test-size": 16,
                           "batch-size": 16, "local-epochs": 1, "dp-noise": "seeded", "min-train-sites": 1,
                           "virtual-tokens": 4})
    # Execute
    glob, results = run_federation(cfg)
    # Assert: every site trained privately each round and the global adapter moved
    start = factory.initial_adapter_state(cfg)
    assert set(glob) == set(start) and any(not torch.equal(glob[k], start[k]) for k in glob)
    for r in results[1:]:
        assert len(r.sites) == 2 and all(0 < m["epsilon"] <= cfg.privacy.target_epsilon for m in r.sites.values())


def test_lora_with_ghost_clipping_still_trains(tiny_dataset, dp_on):
    from dataclasses import replace

    from fedpeft import training
    from fedpeft.config import TrainConfig

    # Prepare: ghost clipping keeps per-example norms, not gradients: the per-example check must not apply
    model = adapters.create_adapter(models.load_base_model(ModelConfig(name="tiny", seed=0), num_labels=7),
                                    AdapterConfig(layers=""), dp=True, base_name="tiny")
    train = TrainConfig(lr=1e-2, batch_size=8, local_epochs=1, seed=0)
    privacy = replace(dp_on, grad_sample_mode="ghost")
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=train, privacy=privacy, num_rounds=2)
    before = adapters.get_adapter_state(model)
    # Execute
    res = training.train_local(model, tiny_dataset, train=train, privacy=privacy, privacy_state=state, device=CPU,
                               seed=1, noise_seed=3)
    # Assert
    assert res.steps == 6 and 0 < res.epsilon <= privacy.target_epsilon
    after = adapters.get_adapter_state(model)
    assert any(not torch.equal(after[k], before[k]) for k in after)
