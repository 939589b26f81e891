"""Greedy generation that keeps the frozen layers' keys and values across rounds
(``fedpeft.tasks.frozen_kv``), against ``generate`` run from scratch on the same adapter, in float64
on tiny random Llama and Qwen2 models with left-padded prompts of different lengths (Mistral's
sliding window falls back to plain ``generate``)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from fedpeft import factory
from fedpeft.tasks import frozen_kv, task_of
from fedpeft.tasks.causal_lm import IGNORE, body_of
from tests.conftest import DEVICES
from tests.test_causal_lm import batch_of, gen_cfg


def left_padded(data, rows: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt part of ``rows``, left-padded as ``CausalLM.generate`` lays a batch out."""
    ids, _, y = data.tensors
    prompts = [ids[i][: int((y[i] != IGNORE).nonzero()[0])] for i in rows]
    width = max(len(p) for p in prompts)
    x = torch.full((len(rows), width), pad, dtype=torch.long)
    m = torch.zeros((len(rows), width), dtype=torch.long)
    for j, p in enumerate(prompts):
        x[j, width - len(p):] = p
        m[j, width - len(p):] = 1
    return x, m


def nudge_adapter(net: torch.nn.Module, seed: int) -> None:
    """A new round's adapter: every LoRA factor of the adapted layer moved at random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * 0.3)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-gemma"])
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.type)
def test_resumed_generation_gives_the_same_scores_as_generate_from_scratch_round_after_round(device, model):
    # Prepare: LoRA on layers 1 and 2 of 3, so layer 0 is frozen and two layers resume (the second
    # reads the first's output over the prompt); prompts of different lengths, left-padded
    cfg = gen_cfg(model, **{"model-layers": 3, "lora-layers": "1,2"})
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=False).double().to(device).eval()
    data = batch_of(cfg, 7)
    pad = int(task.tokenizer(cfg.model).pad_token_id or 0)
    x, m = (t.to(device) for t in left_padded(data, [0, 3, 5, 6], pad))
    assert int(m.sum(1).min()) < x.shape[1]  # at least one row is padded
    gen = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=pad, output_scores=True,
                           return_dict_in_generate=True)
    memo: dict = {}
    kept: list[torch.Tensor] = []
    for rnd in range(3):
        # Execute: the same prompts under three successive adapters
        plain = net.generate(input_ids=x, attention_mask=m, generation_config=gen)
        extra = frozen_kv.generate_kwargs(body_of(net)[1], memo, "batch", x, m, start=1)
        resumed = net.generate(input_ids=x, attention_mask=m, generation_config=gen, **extra)
        # Assert: the same tokens and the same scores at every step, the frozen part made once and unchanged
        assert torch.equal(resumed.sequences, plain.sequences)
        for a, b in zip(resumed.scores, plain.scores):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert list(memo) == ["batch"]
        if rnd == 0:
            kept = [t.clone() for t in (*memo["batch"].keys, *memo["batch"].values, memo["batch"].hidden)]
        now = [*memo["batch"].keys, *memo["batch"].values, memo["batch"].hidden]
        assert len(now) == len(kept) == 3 and all(torch.equal(a, b) for a, b in zip(now, kept))
        nudge_adapter(net, seed=rnd)


def test_evaluate_on_the_frozen_prefix_keeps_the_prompts_keys_and_answers_as_the_full_model_does():
    # Prepare: the same held-out rows as plain token ids and as the frozen-prefix cache
    cfg = gen_cfg("tiny-llama", **{"eval-generations": 6})
    task = task_of(cfg.model)
    net = factory.build_model(cfg, dp=False).double()
    data = batch_of(cfg, 6)
    cached = task.compute_prefix(net, data, start_layer=1, ffn_start=False, precision="float32")
    cpu = torch.device("cpu")
    for rnd in range(2):
        # Execute
        full = task.evaluate(net, data, device=cpu, precision="float32", num_labels=0, cfg=cfg.model)
        resumed = task.evaluate(net, cached, device=cpu, precision="float32", num_labels=0, cfg=cfg.model)
        answers_full = task.generate_rows(net, data.tensors[0], data.tensors[2], cfg.model, device=cpu,
                                          precision="float32")
        answers_resumed = task.generate_rows(net, cached.ids, cached.tensors[2], cfg.model, device=cpu,
                                             precision="float32", memo=cached.memo, start=1)
        # Assert: one kept batch (six prompts), the same answers and metrics as the full model's
        assert len(cached.memo) == 1
        assert answers_resumed == answers_full
        assert resumed["accuracy"] == full["accuracy"] and resumed["generated"] == full["generated"] == 6.0
        assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-9)
        nudge_adapter(net, seed=10 + rnd)


def test_no_frozen_layers_a_one_token_prompt_or_a_sliding_window_falls_back_to_plain_generate():
    # Prepare: Mistral's layers keep only their 16-token window in a cache
    body = body_of(factory.build_model(gen_cfg("tiny-llama"), dp=False).double())[1]
    mistral = body_of(factory.build_model(gen_cfg("tiny-mistral"), dp=False).double())[1]
    memo: dict = {}
    x = torch.tensor([[5, 6, 7]])
    m = torch.ones_like(x)
    # Execute
    none_frozen = frozen_kv.generate_kwargs(body, memo, "a", x, m, start=0)
    one_token = frozen_kv.generate_kwargs(body, memo, "b", x[:, :1], m[:, :1], start=1)
    windowed = frozen_kv.generate_kwargs(mistral, memo, "c", x, m, start=1)
    # Assert: nothing to resume from, and nothing kept
    assert none_frozen == {} and one_token == {} and windowed == {} and memo == {}
    assert frozen_kv.generate_kwargs(body, memo, "d", x, m, start=1) != {} and list(memo) == ["d"]  # the control


def test_a_sites_kept_prompt_states_count_against_its_workers_memory_budget():
    # Prepare: a fresh worker cache; LoRA on layer 1 of 2, so the site's held-out set is a frozen prefix
    from fedpeft import prefix, site

    cfg = gen_cfg("tiny-llama")
    glob = factory.initial_adapter_state(cfg)
    site._SITES.clear()
    work = site.site_work(cfg, site=0, num_sites=2)
    assert isinstance(work.test, prefix.PrefixDataset) and work.test.memo == {}
    before = site._SITES.used
    # Execute: the site scores the global adapter (greedy answers on its held-out prompts)
    site.site_evaluate(cfg, site=0, num_sites=2, global_state=glob)
    # Assert: the kept keys, values and layer-1 inputs are counted, to the byte
    kept = sum(t.numel() * t.element_size() for f in work.test.memo.values() for t in (*f.keys, *f.values, f.hidden))
    assert kept > 0 and work.test.memo_bytes == kept
    assert site._SITES.used == before + kept == work.nbytes
    site._SITES.clear()


def test_an_entry_grown_past_the_budget_leaves_the_cache():
    # Prepare
    from fedpeft import prefix

    lru = prefix.BytesLRU(100)
    lru.put("a", 1, 40)
    # Execute: the same entry, now larger than the whole budget
    lru.put("a", 1, 140)
    # Assert
    assert lru.get("a") is None and lru.used == 0 and len(lru) == 0


def test_the_memo_answers_only_the_prompts_it_was_made_from():
    # Prepare: two batches of the same shape that differ in one token
    x = torch.tensor([[0, 5, 6, 7], [4, 5, 6, 7]])
    m = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    y = x.clone()
    y[1, 2] = 9
    # Execute
    keys = {frozen_kv.batch_key(x, m), frozen_kv.batch_key(y, m), frozen_kv.batch_key(x, torch.ones_like(m))}
    # Assert: three different keys; the same batch keys the same
    assert len(keys) == 3 and frozen_kv.batch_key(x.clone(), m.clone()) == frozen_kv.batch_key(x, m)
