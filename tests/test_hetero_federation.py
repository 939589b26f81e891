"""Mixed ranks end to end on a tiny model: a site's start reproduces the global model, replies are
checked against their declared rank, the strategy's merge is the rule's, the export loads in PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedpeft import adapters, models, ranks
from fedpeft.config import ConfigError
from fedpeft.factory import build_model, global_adapter_config, initial_adapter_state, worker_model
from fedpeft.federation import ReplyError
from fedpeft.runconfig import from_run_config
from fedpeft.site import site_train

TINY = {"model": "tiny", "lora-layers": "", "lr": 0.01, "adapter-lr-scale": 1.0, "notes-per-site": 40,
        "test-per-site": 10, "num-server-rounds": 2, "batch-size": 16, "dp-noise": "seeded",
        "lora-ranks": "2,4,8", "lora-alpha": 16.0}
RULES = ["zero_pad", "svd", "stack", "frozen_a"]


def _batch(cfg):
    tok = models.load_tokenizer("tiny")
    enc = tok(["chest pain and palpitations", "fever, cough, wheeze in a child"], return_tensors="pt",
              padding=True)
    return enc


def _logits(model, enc):
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


def _trained_global(cfg, seed=1):
    """A global adapter with a non-zero update: one merge of three sites' random local adapters."""
    glob = initial_adapter_state(cfg)
    g = torch.Generator().manual_seed(seed)
    locals_ = []
    for k, r in enumerate(cfg.adapter.rank_list):
        start = ranks.start_state(cfg, glob, r)
        local = {key: v + (0 if (cfg.rank_rule == "frozen_a" and key.endswith(ranks.A_SUFFIX)) else
                          0.05 * torch.randn(v.shape, generator=g)) for key, v in start.items()}
        locals_.append((local, r, float(10 + k)))
    new, _ = ranks.merge_states(cfg, glob, locals_)
    return new


@pytest.mark.parametrize("rule", RULES)
def test_site_at_top_rank_starts_from_exactly_the_global_model(rule):
    """The projection (and, for stack, the fold into the base) is faithful: a site starts from the
    global model itself when its rank allows it (stack: at any rank)."""
    # Prepare
    cfg = from_run_config({**TINY, "merge": rule})
    glob = _trained_global(cfg)
    enc = _batch(cfg)
    server = build_model(cfg, dp=False, adapter=global_adapter_config(cfg, glob))
    adapters.set_adapter_state(server, glob)
    rank = 2 if rule == "stack" else cfg.adapter.max_rank
    # Execute
    start = ranks.start_state(cfg, glob, rank)
    fold = ranks.folded_update(glob) if rule == "stack" else None
    site = worker_model(cfg, start, ranks.site_adapter(cfg, rank), fold=fold)
    # Assert
    torch.testing.assert_close(_logits(site, enc), _logits(server, enc), rtol=1e-4, atol=1e-5)
    adapters.fold_into_base(site, {})  # leave the cached worker model's base as it was


@pytest.mark.parametrize("rule", RULES)
def test_site_train_sends_its_own_rank_and_frozen_a_keeps_a(rule):
    # Prepare
    cfg = from_run_config({**TINY, "merge": rule})
    glob = initial_adapter_state(cfg)
    # Execute: site 1 trains rank 4 (cycling 2, 4, 8)
    delta, metrics, _ = site_train(cfg, site=1, num_sites=3, server_round=1, global_state=glob, privacy_json=None)
    # Assert
    assert metrics["lora-rank"] == 4
    a_keys = [k for k in glob if k.endswith(ranks.A_SUFFIX)]
    b_keys = [k for k in glob if k.endswith(ranks.B_SUFFIX)]
    assert all(delta[k].shape[1] == 4 for k in b_keys)
    if rule == "frozen_a":  # only B (and the head) leave the site
        assert not set(a_keys) & set(delta)
    else:
        assert all(delta[k].shape[0] == 4 for k in a_keys)
    assert any(float(delta[k].abs().max()) > 0 for k in b_keys)


def _content(delta, *, site, rank, n=10):
    from flwr.app import MetricRecord, RecordDict

    from fedpeft.federation import to_arrays

    return RecordDict({"arrays": to_arrays(delta), "metrics": MetricRecord({"num-examples": n, "site": site,
                                                                            "lora-rank": rank})})


def test_strategy_merges_by_rank_and_rejects_a_reply_contradicting_its_rank(tmp_path):
    from fedpeft.federation import from_arrays, validate_train_reply
    from fedpeft.strategy import make_strategy
    from tests.test_aggregation import _Reply

    # Prepare: svd, DP off (no ledgers), three sites of ranks 2, 4, 8
    cfg = from_run_config({**TINY, "merge": "svd", "dp": False, "out-dir": str(tmp_path), "min-train-sites": 1})
    glob = initial_adapter_state(cfg)
    strategy = make_strategy(cfg)
    strategy._global = glob
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for site, r in enumerate((2, 4, 8)):
        start = ranks.start_state(cfg, glob, r)
        deltas[site] = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    lying = {k: v.clone() for k, v in deltas[1].items()}  # rank-4 tensors, declared rank 8
    # Execute
    with pytest.raises(ReplyError, match=r"declared lora-rank=8"):
        validate_train_reply(_content(lying, site=1, rank=8), expected=glob, expected_for=strategy._expected_for())
    with pytest.raises(ReplyError, match=r"lora-rank=5: .*not one of the run's lora-ranks"):
        validate_train_reply(_content(deltas[0], site=0, rank=5), expected=glob,
                             expected_for=strategy._expected_for())
    replies = [_Reply(_content(deltas[s], site=s, rank=r), node=s + 1) for s, r in enumerate((2, 4, 8))]
    replies.append(_Reply(_content(lying, site=3, rank=8), node=9))
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: the lying reply is dropped, the rest merged exactly as merge_states does
    assert len(strategy.rounds[1].rejected) == 1 and "declared lora-rank=8" in strategy.rounds[1].rejected[0]
    locals_ = [({k: v + deltas[s][k] for k, v in ranks.start_state(cfg, glob, r).items()}, r, 10.0)
               for s, r in enumerate((2, 4, 8))]
    expected, _ = ranks.merge_states(cfg, glob, locals_)
    got = from_arrays(arrays)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)
    assert strategy.rounds[1].ranks == {0: 2, 1: 4, 2: 8}
    assert 0 <= strategy.rounds[1].dropped_energy < 1


@pytest.mark.parametrize("rule", RULES)
def test_mixed_rank_export_round_trips_through_peft(tmp_path, rule):
    # Prepare
    cfg = from_run_config({**TINY, "merge": rule})
    glob = _trained_global(cfg)
    model = build_model(cfg, dp=False, adapter=global_adapter_config(cfg, glob))
    adapters.set_adapter_state(model, glob)
    enc = _batch(cfg)
    # Execute
    adapters.save_adapter(model, tmp_path / "adapter", metadata={"merge": rule})
    base = models.load_base_model(cfg.model, num_labels=len(cfg.data.label_list), labels=cfg.data.label_list)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    # Assert: same logits; scaling 1 recorded in the PEFT config
    torch.testing.assert_close(_logits(loaded, enc), _logits(model, enc), rtol=0, atol=0)
    pc = loaded.peft_config["default"]
    assert pc.lora_alpha / pc.r == 1.0 and pc.r == ranks.state_rank(glob)
    if rule == "stack":
        assert pc.r == cfg.adapter.max_rank + 2 + 4 + 8  # the initial rank + one round's stack


def test_fedavg_with_mixed_ranks_is_a_clear_error():
    with pytest.raises(ConfigError, match="merge='fedavg' .* mixes ranks"):
        from_run_config({**TINY, "merge": "fedavg"})
