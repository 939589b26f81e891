"""The causal-lm task on tiny random Llama, GPT-2, Qwen2, Mistral and Gemma models: response-only loss, Opacus'
per-sample gradients and clipping against a brute-force per-example loop in float64, the
frozen-prefix path against the full forward, and LoRA weights that move under DP."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft import factory
from fedpeft.data.instructions import generate_referrals
from fedpeft.runconfig import from_run_config
from fedpeft.tasks import task_of
from fedpeft.tasks.causal_lm import IGNORE, answer_of, shared_prefix
from tests.conftest import DEVICES, one_private_site_round

TARGETS = {"tiny-llama": "q_proj,v_proj,down_proj", "tiny-gpt2": "c_attn,c_fc", "tiny-qwen2": "q_proj,v_proj,down_proj",
           "tiny-mistral": "q_proj,v_proj,down_proj", "tiny-gemma": "q_proj,v_proj,down_proj"}
RESUMABLE = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma"]  # decoders whose layers resume from cached states


def gen_cfg(model: str, /, **extra):
    flat = {"task": "causal-lm", "model": model, "data": "referrals", "lora-layers": "1", "lora-rank": 4,
            "lora-target-modules": TARGETS[model], "max-length": 96, "notes-per-site": 24, "test-per-site": 6,
            "global-test-size": 6, "batch-size": 8, "eval-generations": 3, "max-new-tokens": 4, **extra}
    return from_run_config(flat)


def batch_of(cfg, n: int = 5):
    prompts, labels, responses = generate_referrals(n=n, seed=3)
    return task_of(cfg.model).encode(cfg.model, factory.Examples(prompts, labels, tuple(responses)))


def test_encoding_masks_the_prompt_and_keeps_the_response_with_its_eos():
    # Prepare
    cfg = gen_cfg("tiny-llama")
    task = task_of(cfg.model)
    tok = task.tokenizer(cfg.model)
    prompts, _, responses = generate_referrals(n=3, seed=1)
    # Execute
    ids, mask, labels = task.encode(cfg.model, factory.Examples(prompts, [0, 0, 0], tuple(responses))).tensors
    # Assert: the supervised tokens decode to exactly the response and the end-of-turn token
    for i in range(3):
        sup = labels[i][labels[i] != IGNORE]
        assert tok.decode(sup) == responses[i] + tok.eos_token
        n = int(mask[i].sum())
        assert (labels[i, n:] == IGNORE).all() and (ids[i, :n][labels[i, :n] != IGNORE] == sup).all()
        assert "<|im_start|>assistant" in tok.decode(ids[i, : n - len(sup)])  # the chat template's answer slot
    assert answer_of(responses[0]) in {"cardiology", "pulmonology", "neurology", "gastroenterology",
                                       "orthopedics", "dermatology", "endocrinology"}


@pytest.mark.parametrize("model", list(TARGETS))
def test_per_sample_gradients_and_clipping_match_a_brute_force_loop_in_float64(model):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # Prepare: LoRA on attention and MLP projections (GPT-2's are Conv1D), float64 throughout
    cfg = gen_cfg(model, **{"lora-layers": ""})
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=True).double()
    with torch.no_grad():  # B = 0 at init would make every per-sample gradient of A zero
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    data = batch_of(cfg, 5)
    batch = data.tensors
    params = [p for p in net.parameters() if p.requires_grad]
    cpu = torch.device("cpu")
    # transformers keeps float32 paths inside float64 models (LlamaRMSNorm, rotary tables, attention
    # masks), so agreement is to ~1e-6 of each tensor's scale (~3e-5 for Gemma, whose norms and scaled
    # embeddings round to float32 too); a wrong per-sample gradient (a batch sum, a missing 1/n) is off by O(1)
    rtol = 1e-4 if model == "tiny-gemma" else 1e-5
    # Execute: brute force, one example at a time
    brute = []
    for i in range(5):
        loss = task.per_example_loss(net, [t[i:i + 1] for t in batch], device=cpu, start={}, precision="float32")
        brute.append(torch.autograd.grad(loss.sum(), params))
    # ... and Opacus' hooks on the batch mean
    gsm = GradSampleModule(net, loss_reduction="mean")
    loss = task.per_example_loss(net, batch, device=cpu, start={}, precision="float32").mean()
    loss.backward()
    # Assert: per-sample gradients equal the loop's
    for j, p in enumerate(params):
        want = torch.stack([g[j] for g in brute])
        torch.testing.assert_close(p.grad_sample, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    # ... and the clipped sum equals the loop's clip-then-sum (C below every norm: all are clipped)
    clip = 0.5 * min(math.sqrt(sum(float(x.pow(2).sum()) for x in g)) for g in brute)
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=5)
    opt.clip_and_accumulate()
    for j, p in enumerate(params):
        want = sum(g[j] * min(1.0, clip / math.sqrt(sum(float(x.pow(2).sum()) for x in g))) for g in brute)
        torch.testing.assert_close(p.summed_grad, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    gsm._close()


@pytest.mark.parametrize("model", RESUMABLE)
def test_the_frozen_prefix_path_equals_the_full_forward_in_float64(model):
    # Prepare: LoRA on layer 1 of 2; layer 0's output cached once (Mistral's 16-token window is
    # shorter than a referral: the resumed layer must use it as the model's own forward does)
    cfg = gen_cfg(model)
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=False).double()
    data = batch_of(cfg, 4)
    assert shared_prefix(*data.tensors[:2]) > 0  # the chat template's system turn: computed once, then continued
    # Execute
    cached = task.compute_prefix(net, data, start_layer=1, ffn_start=False, precision="float32")
    full = task.per_example_loss(net, data.tensors, device=torch.device("cpu"), start={}, precision="float32")
    resumed = task.per_example_loss(net, cached.tensors, device=torch.device("cpu"), start={"start_layer": 1},
                                    precision="float32")
    # Assert: the same loss per example, and the cache keeps the token ids for generation
    torch.testing.assert_close(resumed, full, rtol=1e-8, atol=0.0)  # float32 paths inside, as above
    assert torch.equal(cached.ids, data.tensors[0])


@pytest.mark.parametrize("model", RESUMABLE)
@pytest.mark.parametrize("start", [0, 1])
def test_the_last_layer_at_response_positions_only_gives_the_full_layers_losses_and_per_sample_gradients(start, model):
    from opacus import GradSampleModule

    from fedpeft.tasks import causal_lm

    # Prepare: LoRA on layers start..1 of 2 (q, v, down), B random; states cached at layer ``start``;
    # the oracle is the same model through transformers' own layer at every position
    cfg = gen_cfg(model, **{"lora-layers": ",".join(str(i) for i in range(start, 2))})
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=True).double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    cached = task.compute_prefix(net, batch_of(cfg, 5), start_layer=start, ffn_start=False, precision="float32")
    batch, at, cpu = cached.tensors, {"start_layer": start}, torch.device("cpu")
    params = [p for p in net.parameters() if p.requires_grad]
    rtol = 1e-5  # float32 paths inside transformers' float64 layers (see the brute-force test)

    def loss_of(rows, response_only):
        task.response_only = response_only
        try:
            return task.per_example_loss(net, rows, device=cpu, start=at, precision="float32")
        finally:
            task.response_only = True

    # Execute: the oracle's per-example losses and gradients, one example at a time
    full = loss_of(batch, False)
    brute = [torch.autograd.grad(loss_of([t[i:i + 1] for t in batch], False).sum(), params) for i in range(5)]
    fast = loss_of(batch, True)
    gsm = GradSampleModule(net, loss_reduction="mean")
    loss_of(batch, True).mean().backward()
    # Assert: the response-only layer ran, gave the same loss per example, and Opacus' per-sample
    # gradients equal the oracle's
    assert causal_lm.response_only_layer(causal_lm.body_of(net)[1])
    torch.testing.assert_close(fast, full, rtol=1e-8, atol=0.0)
    for j, p in enumerate(params):
        want = torch.stack([g[j] for g in brute])
        torch.testing.assert_close(p.grad_sample, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    gsm._close()


def test_the_lm_heads_zero_padding_rows_under_bfloat16_leave_losses_and_per_sample_gradients_alone(monkeypatch):
    from opacus import GradSampleModule

    from fedpeft.tasks import causal_lm

    # Prepare: bfloat16 autocast on the CPU pads the head's rows to a multiple of 16; the oracle is
    # the same batch unpadded (head_rows = 1)
    cfg = gen_cfg("tiny-llama")
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch, cpu = batch_of(cfg, 5).tensors, torch.device("cpu")
    params = [p for p in net.parameters() if p.requires_grad]
    head_rows = causal_lm.head_rows
    seen: list[int] = []
    net.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    gsm = GradSampleModule(net, loss_reduction="mean")

    def run(rows_multiple):
        monkeypatch.setattr(causal_lm, "head_rows", lambda device, precision: rows_multiple)
        gsm.zero_grad(set_to_none=True)
        loss = task.per_example_loss(net, batch, device=cpu, start={}, precision="bfloat16")
        loss.mean().backward()
        return loss.detach(), [p.grad_sample.clone() for p in params]

    # Execute
    plain_loss, plain_gs = run(1)
    padded_loss, padded_gs = run(16)
    # Assert: the head saw a padded multiple of 16 the second time only, and nothing else changed
    n_response = int((batch[2][:, 1:] != IGNORE).sum())
    assert n_response % 16 != 0 and seen == [n_response, n_response + (-n_response % 16)]
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-6, atol=0.0)
    for got, want in zip(padded_gs, plain_gs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    gsm._close()
    assert (head_rows(cpu, "bfloat16"), head_rows(cpu, "float32")) == (16, 1)  # float32 (MKL): unpadded


def test_a_method_hooked_on_the_whole_last_layer_keeps_the_full_layer_and_its_losses():
    from fedpeft.tasks.causal_lm import body_of, last_layer_at

    # Prepare: LoReFT sits on layer 1's output through a forward hook on the layer itself
    cfg = gen_cfg("tiny-llama", adapter="loreft")
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=False).double()
    _, body = body_of(net)
    cached = task.compute_prefix(net, batch_of(cfg, 4), start_layer=1, ffn_start=False, precision="float32")
    x, mask = cached.tensors[0], cached.tensors[1]
    # Execute
    skipped = last_layer_at(body, x.double(), mask, torch.zeros((4, 1), dtype=torch.long))
    resumed = task.per_example_loss(net, cached.tensors, device=torch.device("cpu"), start={"start_layer": 1},
                                    precision="float32")
    full = task.per_example_loss(net, batch_of(cfg, 4).tensors, device=torch.device("cpu"), start={},
                                 precision="float32")
    # Assert: the response-only layer declines (it would bypass the hook), and the losses still match
    assert skipped is None and body.layers[-1]._forward_hooks
    torch.testing.assert_close(resumed, full, rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("model", list(TARGETS))
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.type)
def test_lora_weights_move_under_dp_and_epsilon_is_spent(device, model, monkeypatch):
    # Prepare: opacus#820 reported adapters silently frozen under DP with recent peft; each
    # architecture through a site's whole path (frozen-prefix cache where it resumes, greedy answers)
    monkeypatch.setenv("FEDPEFT_DEVICE", device.type)
    cfg = gen_cfg(model, **{"lr": 0.05, "adapter-lr-scale": 1.0})
    # Execute
    start, after, res, (net, data) = one_private_site_round(cfg, device)
    # Assert: every adapter tensor moved, epsilon is positive and within the plan's budget
    for k, v in after.items():
        assert float((v - start[k]).abs().max()) > 1e-4, k
    assert 0 < res.epsilon <= cfg.privacy.target_epsilon and res.steps > 0
    ev = factory.evaluate(cfg, net, data)
    assert set(ev) >= {"accuracy", "loss", "perplexity"} and ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))


def test_a_local_model_folder_loads_as_its_architecture_with_its_frozen_prefix(tmp_path):
    from fedpeft import llm

    # Prepare: a random Qwen2 saved as a plain transformers folder (safetensors and its tokenizer)
    tiny = gen_cfg("tiny-qwen2")
    task = task_of(tiny.model)
    llm.load_causal_lm(tiny.model).save_pretrained(tmp_path)
    task.tokenizer(tiny.model).save_pretrained(tmp_path)
    cfg = gen_cfg("tiny-qwen2", **{"model": str(tmp_path)})
    data = batch_of(cfg, 4)
    # Execute
    kind, start = llm.model_type(cfg.model.name), task.prefix_start(cfg.model, cfg.adapter)
    losses = [task.per_example_loss(factory.build_model(c, dp=False), data.tensors, device=torch.device("cpu"),
                                    start={}, precision="float32") for c in (cfg, tiny)]
    # Assert: read from its config, resumed above its frozen layer 0, the same model as the named one
    assert (kind, start) == ("qwen2", 1)
    torch.testing.assert_close(losses[0], losses[1], rtol=0.0, atol=0.0)


def test_a_model_folder_with_bidirectional_attention_is_refused_naming_the_model(tmp_path):
    from fedpeft import llm

    # Prepare: a random Gemma saved with bidirectional attention (an encoder-style config)
    tiny = gen_cfg("tiny-gemma")
    model = llm.load_causal_lm(tiny.model)
    model.config.use_bidirectional_attention = True
    model.save_pretrained(tmp_path)
    task_of(tiny.model).tokenizer(tiny.model).save_pretrained(tmp_path)
    # Execute / Assert: refused at load, with the model and the config field named
    with pytest.raises(ValueError, match=r"model=.*use_bidirectional_attention=True"):
        llm.load_causal_lm(gen_cfg("tiny-gemma", **{"model": str(tmp_path)}).model)


def test_instruction_loaders_read_alpaca_csv_jsonl_and_chat_and_name_bad_rows(tmp_path):
    import json

    from fedpeft.data.instructions import load_instructions
    from fedpeft.data.loaders import DataLoadError
    from fedpeft.tasks.causal_lm import messages_of

    # Prepare: the same two examples in the three layouts
    rows = [{"instruction": "Name the specialty.", "input": "Chest pain on exertion.", "output": "Cardiology"},
            {"instruction": "Expand: SOB", "input": "", "output": "shortness of breath"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "a.csv").write_text("instruction,input,output\n" + "\n".join(
        f'"{r["instruction"]}","{r["input"]}","{r["output"]}"' for r in rows) + "\n")
    chats = [{"messages": [{"role": "user", "content": "Name the specialty.\n\nChest pain on exertion."},
                           {"role": "assistant", "content": "Cardiology"}]},
             {"messages": [{"role": "user", "content": "Expand: SOB"}, {"role": "assistant", "content": "shortness of breath"}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in chats))
    # Execute
    got = [load_instructions(tmp_path / name) for name in ("a.jsonl", "a.csv", "c.jsonl")]
    # Assert: one meaning whatever the layout
    for prompts, responses in got:
        assert responses == ["Cardiology", "shortness of breath"]
        assert [messages_of(p) for p in prompts] == [[m for m in c["messages"][:-1]] for c in chats]
    # Bad rows: file, row and field named
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataLoadError, match=r"bad\.jsonl: line 2: field 'output' is missing"):
        load_instructions(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("instruction,input,output\nx,,y\nz,,\n")
    with pytest.raises(DataLoadError, match=r"bad\.csv: row 3: field 'output' is empty"):
        load_instructions(tmp_path / "bad.csv")
    (tmp_path / "badchat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                     {"role": "user", "content": "again"}]}))
    with pytest.raises(DataLoadError, match=r"badchat\.jsonl: line 1: field 'messages': the last message"):
        load_instructions(tmp_path / "badchat.jsonl")
    (tmp_path / "badrole.jsonl").write_text(json.dumps({"messages": [{"role": "doctor", "content": "hi"},
                                                                     {"role": "assistant", "content": "ok"}]}))
    with pytest.raises(DataLoadError, match=r"line 1: field 'messages\[0\]'"):
        load_instructions(tmp_path / "badrole.jsonl")


def test_referral_sites_are_non_iid_and_the_config_refuses_mismatched_task_and_data():
    from fedpeft.config import ConfigError
    from fedpeft.data.sites import make_site

    # Prepare / Execute
    cfg = gen_cfg("tiny-llama", **{"notes-per-site": 200})
    a, b = (make_site(s, 4, cfg.data, seed=0, task="causal-lm") for s in (1, 2))
    # Assert: site 1 (a cardiology centre) answers cardiology far more often than site 2 (children's hospital)
    share = [sum(r.startswith("Cardiology:") for r in s.train_targets) / len(s.train_targets) for s in (a, b)]
    assert share[0] > share[1] + 0.2
    assert all(answer_of(r) == ["cardiology", "pulmonology", "neurology", "gastroenterology", "orthopedics",
                                "dermatology", "endocrinology"][y] for r, y in zip(a.train_targets, a.train_labels))
    with pytest.raises(ConfigError, match=r"data='notes' is the classification generator; task='causal-lm' needs "
                                          r"data='referrals'"):
        from_run_config({"task": "causal-lm", "model": "tiny-llama"})
    with pytest.raises(ConfigError, match=r"model='minilm': is a BERT encoder"):
        from_run_config({"task": "causal-lm", "data": "referrals"})
    with pytest.raises(ConfigError, match=r"grad-sample-mode='ghost' with task='causal-lm'"):
        from_run_config({"task": "causal-lm", "model": "tiny-llama", "data": "referrals", "grad-sample-mode": "ghost"})


@pytest.mark.parametrize("merge,extra", [("svd", {"lora-ranks": "2,4"}), ("median", {"num-sites": 3}),
                                         ("norm_bound", {})])
def test_rank_rules_and_robust_merges_run_on_the_generative_task(merge, extra):
    from fedpeft.inprocess import run_federation

    # Prepare: the tiny generative federation, in process (the sites' own code, the registered merge)
    cfg = gen_cfg("tiny-llama", **{"merge": merge, "num-sites": 2, "num-server-rounds": 2, "dp-noise": "seeded",
                                   "notes-per-site": 16, "min-train-sites": 1, **extra})
    # Execute
    glob, results = run_federation(cfg)
    # Assert: every round merged every site into a finite global adapter of the global rank
    assert [r.round for r in results] == [0, 1, 2] and all(len(r.sites) == cfg.federation.num_sites for r in results[1:])
    assert all(torch.isfinite(v).all() for v in glob.values())
    start = factory.initial_adapter_state(cfg)
    assert set(glob) == set(start) and any(not torch.equal(glob[k], start[k]) for k in glob)
    for r in results[1:]:
        assert all(0 < m["epsilon"] <= cfg.privacy.target_epsilon for m in r.sites.values())
