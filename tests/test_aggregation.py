"""Merge rules against hand-computed values; the strategy drops malformed replies and goes on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedpeft.aggregation import available_merges, create_merge
from fedpeft.config import FederationConfig, PrivacyConfig, RunConfig
from fedpeft.federation import ReplyError, to_arrays, validate_train_reply
from fedpeft.strategy import DeltaMerge, MergePolicy, make_strategy

GLOBAL = {"a.lora_A.weight": torch.zeros(2, 3), "head.bias": torch.zeros(2)}


def test_fedavg_weighted_mean_hand_computed():
    # Prepare: weights 1 and 3 -> 0.25 * d1 + 0.75 * d2
    d1 = {"w": torch.tensor([4.0, 0.0]), "b": torch.tensor([1.0])}
    d2 = {"w": torch.tensor([0.0, 8.0]), "b": torch.tensor([-1.0])}
    # Execute
    out = create_merge("fedavg")([d1, d2], [1.0, 3.0])
    # Assert
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 6.0]), rtol=0, atol=0)
    torch.testing.assert_close(out["b"], torch.tensor([-0.5]), rtol=0, atol=0)


def test_merge_registry_names_unknown_rule():
    assert "fedavg" in available_merges()
    with pytest.raises(ValueError, match="merge='svd-magic'"):
        create_merge("svd-magic")


class _Reply:
    """The part of flwr's Message the strategy reads (building real Messages needs a live run)."""

    def __init__(self, content=None, *, node: int = 1, error: str | None = None) -> None:
        self.content = content
        self.metadata = SimpleNamespace(src_node_id=node)
        self.error = SimpleNamespace(reason=error)

    def has_error(self) -> bool:
        return self.error.reason is not None


def _reply(delta, *, site=0, n=10, node=1, error: str | None = None) -> _Reply:
    if error:
        return _Reply(node=node, error=error)
    return _Reply(RecordDict({"arrays": to_arrays(delta), "metrics": MetricRecord({"num-examples": n, "site": site})}),
                  node=node)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"a.lora_A.weight": torch.zeros(2, 3)}, "missing adapter keys"),
        ({**GLOBAL, "bert.pooler.dense.weight": torch.zeros(2, 2)}, "names a frozen base weight"),
        ({**GLOBAL, "b.lora_A.weight": torch.zeros(2, 3)}, "unexpected adapter keys"),
        ({"a.lora_A.weight": torch.zeros(2, 3, dtype=torch.float64), "head.bias": torch.zeros(2)}, "dtype torch.float64"),
        ({"a.lora_A.weight": torch.zeros(3, 3), "head.bias": torch.zeros(2)}, r"shape \(3, 3\)"),
        ({"a.lora_A.weight": torch.full((2, 3), float("inf")), "head.bias": torch.zeros(2)}, "NaN or Inf"),
    ],
)
def test_validate_rejects_malformed_updates(bad, message):
    content = RecordDict({"arrays": to_arrays(bad), "metrics": MetricRecord({"num-examples": 5, "site": 0})})
    with pytest.raises(ReplyError, match=message):
        validate_train_reply(content, expected=GLOBAL)


def test_validate_rejects_bad_example_count():
    content = RecordDict({"arrays": to_arrays(GLOBAL), "metrics": MetricRecord({"num-examples": 0, "site": 0})})
    with pytest.raises(ReplyError, match="num-examples=0"):
        validate_train_reply(content, expected=GLOBAL)


def _strategy(min_valid: int = 1) -> DeltaMerge:
    s = DeltaMerge(min_train_nodes=1, min_available_nodes=1, policy=MergePolicy(min_valid_replies=min_valid))
    s._global = {k: v.clone() for k, v in GLOBAL.items()}
    return s


def test_strategy_drops_malformed_and_failed_replies_and_merges_the_rest():
    # Prepare
    good1 = {k: torch.ones_like(v) for k, v in GLOBAL.items()}
    good2 = {k: 3 * torch.ones_like(v) for k, v in GLOBAL.items()}
    bad = {"a.lora_A.weight": torch.zeros(9, 9), "head.bias": torch.zeros(2)}
    replies = [_reply(good2, site=2, n=30), _reply(bad, site=1), _reply(good1, site=0, n=10),
               _reply(good1, error="site 3: cannot load data (missing.csv): file not found")]
    strategy = _strategy()
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: (10*1 + 30*3)/40 = 2.5 on every element; two rejections recorded with reasons
    new = arrays.to_torch_state_dict()
    torch.testing.assert_close(new["head.bias"], torch.full((2,), 2.5), rtol=0, atol=0)
    log = strategy.rounds[1]
    assert sorted(log.train) == [0, 2] and len(log.rejected) == 2
    assert any("shape (9, 9)" in r for r in log.rejected)
    assert any("site 3: cannot load data" in r for r in log.rejected)
    assert metrics["sites"] == 2


def test_strategy_skips_round_below_minimum():
    strategy = _strategy(min_valid=2)
    arrays, metrics = strategy.aggregate_train(1, [_reply(GLOBAL, site=0)])
    assert arrays is None and metrics is None and strategy.rounds[1].skipped


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_make_strategy_builds_flower_strategies_over_deltas(name):

    cfg = RunConfig(federation=FederationConfig(strategy=name, num_sites=3), privacy=PrivacyConfig(enabled=False))
    s = make_strategy(cfg)
    assert isinstance(s, DeltaMerge)
    assert s.policy.merge == "fedavg" and s.policy.min_valid_replies == cfg.federation.min_train_sites
    assert s.policy.ledgers is None and s.policy.rank_cfg is None  # no DP, equal ranks


def test_flower_fedadam_runs_on_top_of_the_delta_merge(monkeypatch):
    """MRO check: FedAdam's server optimiser sees global + merged delta as its aggregate."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):  # what a live run sets
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)

    from fedpeft.federation import to_arrays

    # Prepare
    cfg = RunConfig(federation=FederationConfig(strategy="fedadam", num_sites=2, min_train_sites=1, server_lr=0.1),
                    privacy=PrivacyConfig(enabled=False))
    strategy = make_strategy(cfg)
    grid = SimpleNamespace(get_node_ids=lambda: [11, 12])
    messages = list(strategy.configure_train(1, to_arrays(GLOBAL), ConfigRecord(), grid))
    delta = {k: torch.full_like(v, 0.5) for k, v in GLOBAL.items()}
    # Execute
    arrays, _ = strategy.aggregate_train(1, [_reply(delta, site=0), _reply(delta, site=1, node=2)])
    new = arrays.to_torch_state_dict()
    # Assert: Adam's first step moves each coordinate by about eta (0.1) along the delta's sign,
    # not by the raw merged delta (0.5): the FedAdam logic ran over our merge
    assert len(messages) == 2 and strategy.rounds[1].bytes_down == 2 * sum(v.numel() * 4 for v in GLOBAL.values())
    assert torch.all(new["head.bias"] > 0) and torch.all(new["head.bias"] < 0.5)


def test_median_trimmed_mean_and_norm_bound_hand_computed():
    # Prepare: one coordinate, five sites; one attacker sends 100
    ds = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    w = [1.0] * 5
    # Execute / Assert: median 3; trimmed (20 % = one each side) mean of 2,3,4 = 3; even count median
    assert float(create_merge("median")(ds, w)["w"]) == 3.0
    assert float(create_merge("trimmed_mean")(ds, w)["w"]) == 3.0
    assert float(create_merge("median")(ds[:4], [1.0] * 4)["w"]) == 2.5
    # norm bounding: bound = median norm 3 -> 1, 2, 3, 3, 3 -> mean 2.4
    assert float(create_merge("norm_bound")(ds, w)["w"]) == pytest.approx(2.4)
    # two coordinates, norms 5 and 10 with explicit bound 5: (3,4) and (3,4)·... -> mean
    from fedpeft.aggregation.robust import norm_bound
    two = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([6.0, 8.0])}]
    torch.testing.assert_close(norm_bound(two, [1.0, 1.0], bound=5.0)["w"], torch.tensor([3.0, 4.0]))


def _reply_m(delta, metrics: dict, node: int = 7) -> _Reply:
    return _Reply(RecordDict({"arrays": to_arrays(delta), "metrics": MetricRecord(metrics)}), node=node)


_BAD = {
    "nan": (lambda: _reply_m({k: torch.full_like(v, float("nan")) for k, v in GLOBAL.items()},
                             {"num-examples": 10, "site": 5}), "NaN or Inf"),
    "shape": (lambda: _reply_m({"a.lora_A.weight": torch.zeros(3, 3), "head.bias": torch.zeros(2)},
                               {"num-examples": 10, "site": 5}), r"shape \(3, 3\)"),
    "dtype": (lambda: _reply_m({"a.lora_A.weight": torch.zeros(2, 3, dtype=torch.float64), "head.bias": torch.zeros(2)},
                               {"num-examples": 10, "site": 5}), "dtype torch.float64"),
    "missing-key": (lambda: _reply_m({"head.bias": torch.zeros(2)}, {"num-examples": 10, "site": 5}),
                    "missing adapter keys"),
    "base-weight": (lambda: _reply_m({**GLOBAL, "bert.encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)},
                                     {"num-examples": 10, "site": 5}), "names a frozen base weight"),
    "no-examples": (lambda: _reply_m(GLOBAL, {"site": 5}), "num-examples=None"),
    "zero-examples": (lambda: _reply_m(GLOBAL, {"num-examples": 0, "site": 5}), "num-examples=0"),
    "negative-examples": (lambda: _reply_m(GLOBAL, {"num-examples": -4, "site": 5}), "num-examples=-4"),
    "absurd-examples": (lambda: _reply_m(GLOBAL, {"num-examples": 10**12, "site": 5}), "absurdly large"),
    "huge-update": (lambda: _reply_m({k: torch.full_like(v, 50.0) for k, v in GLOBAL.items()},
                                     {"num-examples": 10, "site": 5}), "beyond what the optimiser"),
    "payload": (lambda: _reply_m({"a.lora_A.weight": torch.zeros(2000, 3), "head.bias": torch.zeros(2)},
                                 {"num-examples": 10, "site": 5}), "over the limit"),
    "stale-round": (lambda: _reply_m(GLOBAL, {"num-examples": 10, "site": 5, "server-round": 1}), "stale reply"),
    "second-reply": (lambda: _reply_m({k: torch.full_like(v, 0.2) for k, v in GLOBAL.items()},
                                      {"num-examples": 10, "site": 0}), "a second reply in round 2"),
}


@pytest.mark.parametrize("kind", sorted(_BAD))
def test_each_bad_update_is_rejected_by_name_and_the_round_merges_the_good_ones(kind):
    from fedpeft.federation import ReplyLimits
    from fedpeft.update_bounds import update_bound

    # Prepare: two good replies (sites 0 and 2) and one bad one; limits: 20 KB, an AdamW DP bound
    good0 = {k: 0.01 * torch.ones_like(v) for k, v in GLOBAL.items()}
    good2 = {k: 0.03 * torch.ones_like(v) for k, v in GLOBAL.items()}
    cfg = RunConfig(privacy=PrivacyConfig(enabled=True))
    strategy = DeltaMerge(min_train_nodes=1, min_available_nodes=1, policy=MergePolicy(
        limits=ReplyLimits(max_bytes=20_000, max_examples=1_000_000), update_bound=update_bound(cfg)))
    strategy._global = {k: v.clone() for k, v in GLOBAL.items()}
    make, message = _BAD[kind]
    ok = {"server-round": 2}
    replies = [_reply_m(good0, {"num-examples": 10, "site": 0, **ok}, node=1), make(),
               _reply_m(good2, {"num-examples": 30, "site": 2, **ok}, node=2)]
    # Execute
    arrays, _ = strategy.aggregate_train(2, replies)
    # Assert: the named error, recorded with site and round; the merge is of the good replies alone
    log = strategy.rounds[2]
    assert len(log.failures) == 1 and log.failures[0]["round"] == 2, log.failures
    assert __import__("re").search(message, log.failures[0]["reason"]), log.failures[0]["reason"]
    expected = create_merge("fedavg")([good0, good2], [10.0, 30.0])
    new = arrays.to_torch_state_dict()
    for k in GLOBAL:
        torch.testing.assert_close(new[k], GLOBAL[k] + expected[k], rtol=0, atol=0)
