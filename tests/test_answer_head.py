"""The whitened answer head (fedpeft.methods.answer_head): its features against a hand computation,
its per-example gradients and per-layer clipping against a brute-force loop in float64, its export
against plain peft, what is exchanged, and the config's refusals."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from fedpeft import adapters, factory
from fedpeft.config import ConfigError
from fedpeft.data.instructions import generate_referrals
from fedpeft.methods import answer_head
from fedpeft.runconfig import from_run_config
from fedpeft.tasks import task_of
from tests.conftest import DEVICES, one_private_site_round


def head_cfg(**extra):
    flat = {"task": "causal-lm", "model": "tiny-llama", "data": "referrals", "lora-layers": "1", "lora-rank": 2,
            "lora-target-modules": "q_proj,v_proj,down_proj", "max-length": 96, "notes-per-site": 24,
            "test-per-site": 6, "global-test-size": 6, "batch-size": 8, "eval-generations": 3,
            "max-new-tokens": 4, "answer-head": True, **extra}
    return from_run_config(flat)


def batch_of(cfg, n: int = 5):
    prompts, labels, responses = generate_referrals(n=n, seed=3)
    return task_of(cfg.model).encode(cfg.model, factory.Examples(prompts, labels, tuple(responses)))


def randomised(net, seed: int = 0):
    """Every trainable tensor random (the head's V and LoRA B start at zero, which zeroes gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if "lm_head" in name else 0.05))
    return net


def test_the_features_are_the_hand_computed_whitening_and_linear_in_the_state():
    # Prepare: statistics with one large constant-like coordinate, as SmolLM2's index 199
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    mu[4] = 44.0
    sd = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    sd[4] = 1.5
    h = mu + sd * torch.randn(3, 6, generator=g, dtype=torch.float64)
    white = answer_head.Whiten(mu, sd)
    # Execute
    z = white(h).double()
    # Assert: z_i = (h_i - mu_i h_j / mu_j) / sd_i, z_j = h_j / mu_j, and z = M h (what the export folds)
    assert white.j == 4 and answer_head.steadiest(mu, sd) == (4, pytest.approx(44.0 / 1.5, rel=1e-12))
    c = h[:, 4:5] / 44.0
    want = (h - mu * c) / sd
    want[:, 4] = c[:, 0]
    torch.testing.assert_close(z, want, rtol=1e-6, atol=1e-6)  # float32 buffers
    torch.testing.assert_close(h @ white.matrix.double().T, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, warns", [("tiny-llama", False), ("tiny-gpt2", True)])
def test_a_model_with_no_steady_coordinate_for_the_bias_is_reported_once(name, warns, monkeypatch, caplog):
    from fedpeft.llm import load_causal_lm

    # Prepare: this process has no statistics yet (the disk copy, if any, is read again)
    monkeypatch.setattr(answer_head, "_STATISTICS", {})
    base = load_causal_lm(head_cfg(model=name).model)
    # Execute: twice, as every model a site builds asks again
    with caplog.at_level("WARNING", logger="fedpeft.methods.answer_head"):
        mu, sd = answer_head.statistics_for(base, ("test", name), name, "referrals", 128)
        answer_head.statistics_for(base, ("test", name), name, "referrals", 128)
    # Assert: the random GPT-2's steadiest coordinate (|mean|/sd ~7.5) is named, once; the Llama's (~37) is not
    j, ratio = answer_head.steadiest(mu, sd)
    assert (ratio < answer_head.STEADY_RATIO) == warns
    said = [r.getMessage() for r in caplog.records if "no steady coordinate" in r.getMessage()]
    assert said == ([f"answer-head on {name}: no steady coordinate to carry the head's bias (the steadiest, {j}, has "
                     f"|mean|/sd = {ratio:.1f} over 128 public prompts; below 10, so the bias varies by "
                     f"~{100 / ratio:.0f} % from prompt to prompt). The head still trains, less well; "
                     "answer-head=false leaves it out."] if warns else [])


def test_the_head_starts_at_zero_and_leaves_the_base_models_logits():
    # Prepare
    cfg = head_cfg()
    net = factory.build_model(cfg, dp=False)
    x = batch_of(cfg, 2).tensors[0]
    base = factory._base_model(__import__("dataclasses").astuple(cfg.model), tuple(cfg.data.label_list), "cpu")
    # Execute
    with torch.no_grad():
        got, want = net(input_ids=x).logits, base(input_ids=x).logits
    # Assert: round 0 is the base model (LoRA B and V are zero)
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("start", [0, 1])
def test_per_sample_gradients_and_per_layer_clipping_match_a_brute_force_loop_in_float64(start):
    from opacus import GradSampleModule
    from opacus.optimizers import DPPerLayerOptimizer

    # Prepare: the head on the full path (start 0) and on cached states with the last layer only at
    # the response positions (start 1), every trainable tensor random, float64
    cfg = head_cfg()
    task = task_of(cfg.model)
    net = randomised(factory.build_model(cfg, dp=True).double())
    data = batch_of(cfg, 5)
    if start:
        data = task.compute_prefix(net, data, start_layer=1, ffn_start=False, precision="float32")
    batch, at, cpu = data.tensors, ({"start_layer": start} if start else {}), torch.device("cpu")
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    assert any("lm_head.lora_A" in n for n, _ in named)
    rtol = 1e-5  # float32 paths inside transformers' float64 layers (tests/test_causal_lm.py)
    # Execute: one example at a time, then Opacus' hooks on the batch mean
    brute = []
    for i in range(5):
        loss = task.per_example_loss(net, [t[i:i + 1] for t in batch], device=cpu, start=at, precision="float32")
        brute.append(torch.autograd.grad(loss.sum(), params))
    gsm = GradSampleModule(net, loss_reduction="mean")
    task.per_example_loss(net, batch, device=cpu, start=at, precision="float32").mean().backward()
    # Assert: per-sample gradients equal the loop's, the head's included
    for j, p in enumerate(params):
        want = torch.stack([g[j] for g in brute])
        torch.testing.assert_close(p.grad_sample, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    # ... and per-layer clipping with the head's share clips each tensor to its own norm (all clipped)
    norms = answer_head.clip_norms(named, 1e-3, 0.5)
    assert norms is not None and math.isclose(math.sqrt(sum(c * c for c in norms)), 1e-3, rel_tol=1e-12)
    opt = DPPerLayerOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=norms,
                              expected_batch_size=5)
    opt.clip_and_accumulate()
    for j, p in enumerate(params):
        want = sum(g[j] * min(1.0, norms[j] / float(g[j].norm())) for g in brute)
        torch.testing.assert_close(p.summed_grad, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    gsm._close()


def test_clip_norms_give_the_head_its_share_and_keep_the_total():
    # Prepare: one head tensor and four others
    named = [("x.lm_head.lora_A.default.weight", None)] + [(f"l{i}.lora_A.default.weight", None) for i in range(4)]
    # Execute
    norms = answer_head.clip_norms(named, 0.1, 0.5)  # type: ignore[arg-type]
    # Assert: hand-computed: head 0.1 * sqrt(0.5), each other 0.1 * sqrt(0.5 / 4)
    assert norms == pytest.approx([0.1 * math.sqrt(0.5)] + [0.1 * math.sqrt(0.125)] * 4, rel=1e-12)
    assert answer_head.clip_norms(named[1:], 0.1, 0.5) is None  # no head: flat clipping


def test_the_exported_adapter_reloads_with_plain_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedpeft.llm import load_causal_lm

    # Prepare: a trained-looking adapter (random V and LoRA)
    cfg = head_cfg()
    net = randomised(factory.build_model(cfg, dp=False)).eval()
    x = batch_of(cfg, 3).tensors[0]
    before = adapters.get_adapter_state(net)
    # Execute
    adapters.save_adapter(net, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(load_causal_lm(cfg.model), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want, got = net(input_ids=x).logits, plain(input_ids=x).logits
    # Assert: the same logits with no fedpeft code; the file holds LoRA tensors only (no embeddings, no
    # whitening buffers); saving left the training model's V as it was
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all("lora_A" in k or "lora_B" in k for k in saved) and "base_model.model.lm_head.lora_A.weight" in saved
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in conf["target_modules"] and conf["layers_to_transform"] is None
    after = adapters.get_adapter_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_the_trainable_head_is_exchanged_not_the_public_selector():
    # Prepare
    cfg = head_cfg()
    net = factory.build_model(cfg, dp=False)
    state = adapters.get_adapter_state(net)
    # Execute: a tampered state naming the selector is refused; the plain state loads
    bad = {**state, "base_model.model.lm_head.lora_B.weight": torch.zeros(net.get_base_model().lm_head.lora_B["default"].weight.shape)}
    # Assert
    assert "base_model.model.lm_head.lora_A.weight" in state
    assert state["base_model.model.lm_head.lora_A.weight"].shape == (7, 32)
    assert not any("lm_head.lora_B" in k for k in state)
    with pytest.raises(adapters.AdapterStateError, match="unexpected adapter keys"):
        adapters.set_adapter_state(net, bad)
    adapters.set_adapter_state(net, state)


@pytest.mark.parametrize("device", DEVICES, ids=[d.type for d in DEVICES])
def test_the_head_moves_under_dp_with_per_layer_clipping_and_epsilon_is_spent(device, monkeypatch):
    # Prepare
    monkeypatch.setenv("FEDPEFT_DEVICE", device.type)
    cfg = head_cfg(**{"lr": 0.05})
    # Execute
    start, after, res, _ = one_private_site_round(cfg, device)
    # Assert: the head and every LoRA tensor moved; epsilon within the plan (same total clipping norm)
    for k, v in after.items():
        assert float((v - start[k]).abs().max()) > 1e-4, k
    assert 0 < res.epsilon <= cfg.privacy.target_epsilon and res.steps > 0


@pytest.mark.parametrize("extra, match", [
    ({"task": "classification", "model": "tiny", "data": "notes"}, "answer-head=True"),
    ({"adapter": "ia3"}, "answer-head=True"),
    ({"merge": "zero_pad"}, "merge='zero_pad' with answer-head"),
    ({"answer-head-calibration": "/tmp/public.jsonl"}, "answer-choices=''"),
    ({"answer-head-clip-share": 1.0}, "answer-head-clip-share=1.0"),
    ({"answer-head-recentre": -1}, "answer-head-recentre=-1"),
    ({"strategy": "fedadam"}, "answer-head-recentre=64 with strategy='fedadam'"),
])
def test_the_config_refuses_what_the_head_cannot_do(extra, match):
    # Execute / Assert: each names its key and value
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        head_cfg(**extra)


def choice_logit_means(net, cfg, prompts):
    """The choices' logits where the answer starts, averaged over ``prompts``: a plain forward of
    the whole model, one prompt at a time (no padding), float32."""
    from fedpeft.llm import load_tokenizer
    from fedpeft.tasks.causal_lm import render_prompt

    tok = load_tokenizer(cfg.model.name)
    ids = answer_head.choice_tokens(tok, cfg.adapter.answer_choice_list)
    with torch.no_grad():
        rows = [net(input_ids=tok(render_prompt(tok, p), return_tensors="pt", add_special_tokens=False)["input_ids"]
                    ).logits[0, -1, ids].double() for p in prompts]
    return torch.stack(rows).mean(0)


def test_recentring_makes_the_choices_mean_logits_on_the_public_prompts_equal():
    from fedpeft.llm import load_tokenizer

    # Prepare: a trained-looking head (random V: the choices' means differ)
    cfg = head_cfg()
    net = randomised(factory.build_model(cfg, dp=False)).eval()
    prompts = answer_head.calibration_prompts("referrals", 12)
    before = choice_logit_means(net, cfg, prompts)
    # Execute
    offsets = answer_head.recentre(net, load_tokenizer(cfg.model.name), prompts, batch_size=5)
    after = choice_logit_means(net, cfg, prompts)
    # Assert: the offsets are each choice's excess over the average; afterwards the means are equal
    assert float(before.std()) > 0.05
    torch.testing.assert_close(offsets.double(), before - before.mean(), rtol=0.0, atol=1e-4)
    torch.testing.assert_close(after, torch.full_like(after, float(before.mean())), rtol=0.0, atol=1e-4)


def test_the_released_adapter_is_recentred_and_only_the_heads_bias_column_moves():
    # Prepare
    cfg = head_cfg(**{"answer-head-recentre": 8, "precision": "float32"})  # float32: exact to 1e-4
    scorer = factory.Scorer(cfg)
    state = adapters.get_adapter_state(randomised(factory.build_model(cfg, dp=False)))
    head_key = next(k for k in state if "lm_head.lora_A" in k)
    # Execute
    out = factory.finish_adapter(cfg, scorer, state)
    off = factory.finish_adapter(head_cfg(**{"answer-head-recentre": 0, "precision": "float32"}), scorer, state)
    # Assert
    assert set(out) == set(state)
    moved = (out[head_key] - state[head_key]).abs().amax(0)
    j = answer_head.head_of(scorer(out)).lora_dropout["default"].j
    assert float(moved[j]) > 1e-3 and float(moved[torch.arange(len(moved)) != j].max()) == 0.0
    for k in state:
        if k != head_key:
            assert torch.equal(out[k], state[k]), k
        assert torch.equal(off[k], state[k]), k  # answer-head-recentre=0: the merged adapter as it is
    means = choice_logit_means(scorer(out), cfg, answer_head.calibration_prompts("referrals", 8))
    assert float(means.std()) < 1e-4


def test_choices_that_share_a_first_token_and_a_missing_calibration_file_are_named(tmp_path):
    # Prepare
    cfg = head_cfg(**{"answer-choices": "Cardiology,Cardiac,Neurology",
                      "answer-head-calibration": str(tmp_path / "none.jsonl")})
    from fedpeft.llm import load_tokenizer

    # Execute / Assert
    with pytest.raises(answer_head.AnswerHeadError, match="start with the same token"):
        answer_head.choice_tokens(load_tokenizer("tiny-llama"), cfg.adapter.answer_choice_list)
    with pytest.raises(answer_head.AnswerHeadError, match="answer-head-calibration="):
        answer_head.calibration_prompts(cfg.adapter.answer_head_calibration, 8)


def test_a_saved_checkpoint_reads_back_as_the_exchanged_state_for_resume(tmp_path):
    from safetensors.torch import load_file

    # Prepare: a trained-looking adapter saved as a round checkpoint (plain PEFT: A = V M, the selector)
    cfg = head_cfg()
    net = randomised(factory.build_model(cfg, dp=False))
    state = adapters.get_adapter_state(net)
    adapters.save_adapter(net, tmp_path / "round-001")
    saved = load_file(str(tmp_path / "round-001" / "adapter_model.safetensors"))
    # Execute
    back = factory.Scorer(cfg).from_saved(saved)
    # Assert: the same keys and values (V through M and back: float32 rounding only)
    assert set(back) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v, rtol=1e-4, atol=1e-4 * float(v.abs().max()))
    assert not torch.allclose(saved["base_model.model.lm_head.lora_A.weight"],
                              state["base_model.model.lm_head.lora_A.weight"])  # the file holds A, not V
    other = {**saved, "base_model.model.lm_head.lora_B.weight": saved["base_model.model.lm_head.lora_B.weight"].roll(1, 0)}
    with pytest.raises(answer_head.AnswerHeadError, match="selects other tokens"):
        factory.Scorer(cfg).from_saved(other)


@pytest.mark.slow
def test_a_simulated_federation_with_the_head_exports_plain_peft_and_resumes_to_the_same_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedpeft.cli import main, simulate, simulation_config
    from fedpeft.export import generate
    from fedpeft.llm import load_causal_lm
    from tests.conftest import ONE_WORKER

    # Prepare: tiny-gen (LoRA + the head, DP on) through Flower's Simulation Engine
    out = tmp_path / "run"
    flat = simulation_config("tiny-gen", [f"dp-noise='seeded' answer-head=true {ONE_WORKER}"], str(out))
    cfg = from_run_config(flat)
    # Execute: the run, then --resume from its last committed round
    metrics = simulate(flat)
    first = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert main(["simulate", "--resume", str(out)]) == 0
    again = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # Assert: every site spent epsilon; the head moved and is in the file as plain peft's lm_head LoRA
    for m in metrics["rounds"][-1]["sites"].values():
        assert 0 < m["epsilon"] <= cfg.privacy.target_epsilon
    assert float(first["base_model.model.lm_head.lora_A.weight"].abs().max()) > 0
    ids = torch.tensor([[1, 20, 300, 4000, 50, 6]])
    served = factory.Scorer(cfg)
    model = served(served.from_saved(first))
    plain = PeftModel.from_pretrained(load_causal_lm(cfg.model), str(out / "adapter")).eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # ... and resuming read the checkpoint back (A -> V) and wrote the same adapter (float32 round trip)
    assert set(again) == set(first)
    for k, v in first.items():
        torch.testing.assert_close(again[k], v, rtol=1e-4, atol=1e-5 * max(1.0, float(v.abs().max())))
    # ... and `fedpeft generate` answers without peft's merge caveat (nothing is merged there)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = generate(out / "adapter", ["Chest pain on exertion."], max_new_tokens=2, precision="float32")
    assert len(answers) == 1
    assert not [w for w in caught if "tied layer" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # the caveat itself still reaches a plain peft user
        warnings.simplefilter("always")
        PeftModel.from_pretrained(load_causal_lm(cfg.model), str(out / "adapter"))
    assert [w for w in caught if "tied layer" in str(w.message)]
