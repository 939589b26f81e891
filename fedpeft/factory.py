"""The model factory a process keeps: the base model (one per config and device), fresh PEFT
models on copies of it, the one long-lived PEFT model per adapter shape that a worker reuses for
every site and round, and the datasets (with their frozen-prefix activations) it builds once."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Mapping

import torch
from torch.utils.data import TensorDataset
from transformers import PreTrainedModel

from fedpeft import adapters, models, prefix, ranks
from fedpeft.config import AdapterConfig, ModelConfig, RunConfig
from fedpeft.tasks import Examples, task_of

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _base_model(model_fields: tuple, labels: tuple[str, ...], device: str) -> PreTrainedModel:
    cfg = ModelConfig(*model_fields)  # the config's fields as a hashable cache key
    model = task_of(cfg).load_model(cfg, list(labels))
    return model.to(torch.device(device))


def base_model(cfg: RunConfig) -> torch.nn.Module:
    """This process's cached base model, on the compute device: read-only, copy it before wrapping."""
    return _base_model(dataclasses.astuple(cfg.model), tuple(cfg.data.label_list), str(models.select_device()))


def new_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, labels: tuple[str, ...], *, dp: bool
               ) -> adapters.PeftModel:
    base = _base_model(dataclasses.astuple(model_cfg), labels, str(models.select_device()))
    task = task_of(model_cfg)
    model = adapters.create_adapter(copy.deepcopy(base), adapter_cfg, dp=dp, base_name=model_cfg.name,
                                    task_type=task.peft_task_type, targets=task.lora_targets(model_cfg, adapter_cfg))
    if adapter_cfg.answer_head:
        from fedpeft import llm
        from fedpeft.methods import answer_head

        # what the frozen weights depend on (not the run's precision: the statistics are float32)
        weights = (model_cfg.task, model_cfg.name, model_cfg.seed, model_cfg.layers)
        mu, sd = answer_head.statistics_for(base, weights, model_cfg.name, adapter_cfg.answer_head_calibration,
                                            answer_head.CALIBRATION_PROMPTS)
        ids = answer_head.choice_tokens(llm.load_tokenizer(model_cfg.name), adapter_cfg.answer_choice_list)
        answer_head.attach(model, ids, mu, sd)
    return model


def build_model(cfg: RunConfig, *, dp: bool, adapter: AdapterConfig | None = None) -> adapters.PeftModel:
    """A fresh adapter (``adapter``, default the run's) on a copy of the cached base model."""
    return new_model(cfg.model, adapter or cfg.adapter, tuple(cfg.data.label_list), dp=dp)


def global_adapter_config(cfg: RunConfig, state: Mapping[str, torch.Tensor] | None = None) -> AdapterConfig:
    """The global adapter's PEFT config: the run's, or with a rank rule rank max(lora-ranks) (or the
    state's, which grows under ``stack``) at scaling 1 (``fedpeft.ranks``)."""
    if cfg.rank_rule is None:
        return cfg.adapter
    return ranks.global_adapter(cfg, ranks.state_rank(state) if state else cfg.adapter.max_rank)


@functools.lru_cache(maxsize=8)
def _worker_model(model_fields: tuple, adapter_fields: tuple, labels: tuple[str, ...], device: str
                  ) -> adapters.PeftModel:
    return new_model(ModelConfig(*model_fields), AdapterConfig(*adapter_fields), labels, dp=False)


def worker_model(cfg: RunConfig, global_state: Mapping[str, torch.Tensor], adapter: AdapterConfig | None = None,
                 *, fold: Mapping[str, torch.Tensor] | None = None) -> adapters.PeftModel:
    """The PEFT model this worker keeps for every site and round (one per adapter shape), loaded
    with ``global_state``; ``fold``: dense updates folded into its frozen base (``stack``).

    Sites of a run share the architecture, and every call starts by loading the adapter (which
    sets every trainable tensor) and the base, so nothing of one site's training reaches the next.
    """
    adapter = adapter or cfg.adapter
    if cfg.privacy.enabled:
        adapters.require_dp_capable(adapter.method)
    model = _worker_model(dataclasses.astuple(cfg.model), dataclasses.astuple(adapter),
                          tuple(cfg.data.label_list), str(models.select_device()))
    adapters.fold_into_base(model, fold or {})
    adapters.freeze_lora_a(model, cfg.rank_rule == "frozen_a")
    adapters.set_adapter_state(model, global_state)
    return model


def initial_adapter_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The round-0 global adapter (seeded, so every party can rebuild it; with a rank rule, rank
    max(lora-ranks), whose A is the shared frozen A of ``frozen_a``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return adapters.get_adapter_state(build_model(cfg, dp=False, adapter=global_adapter_config(cfg)))


def finish_adapter(cfg: RunConfig, scorer: Scorer, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The federation's final global adapter as released: with the answer head, its choices
    recentred on ``answer-head-recentre`` public calibration prompts (server-side post-processing,
    no privacy cost); otherwise ``state`` unchanged."""
    n = cfg.adapter.answer_head_recentre
    if not cfg.adapter.answer_head or n == 0:
        return dict(state)
    from fedpeft import llm
    from fedpeft.methods import answer_head

    model = scorer(state)
    offsets = answer_head.recentre(model, llm.load_tokenizer(cfg.model.name),
                                   answer_head.calibration_prompts(cfg.adapter.answer_head_calibration, n),
                                   precision=models.resolve_precision(cfg.model.precision, models.select_device()))
    log.info("recentred the answer head's choices on %d public prompts (offsets %s)", n,
             ", ".join(f"{float(o):+.2f}" for o in offsets))
    return adapters.get_adapter_state(model)


_PREFIX_CACHE = prefix.PrefixCache()


def dataset(cfg: RunConfig, texts: list[str], labels: list[int], targets: list[str] | tuple[str, ...] = ()
            ) -> TensorDataset:
    """The task's token dataset, or, when the adapter leaves the bottom layers frozen, their cached
    output (computed once per example set; see ``fedpeft.prefix``)."""
    task = task_of(cfg.model)
    examples = Examples(list(texts), list(labels), tuple(targets))
    start = task.prefix_start(cfg.model, cfg.adapter)
    if start == 0:
        return task.encode(cfg.model, examples)
    base = base_model(cfg)
    precision = models.resolve_precision(cfg.model.precision, next(base.parameters()).device)
    model_key = dataclasses.astuple(dataclasses.replace(cfg.model, precision=precision))
    ffn = task.ffn_start(cfg.model, cfg.adapter)
    key = prefix.fingerprint(texts, labels, (model_key, start, ffn), targets)  # the head is not cached
    cached = _PREFIX_CACHE.get(key)
    if cached is None:
        computed = task.compute_prefix(base, task.encode(cfg.model, examples), start_layer=start, ffn_start=ffn,
                                       precision=precision)
        assert isinstance(computed, prefix.PrefixDataset)
        _PREFIX_CACHE.put(key, computed)
        return computed
    return cached


def evaluate(cfg: RunConfig, model: torch.nn.Module, data: TensorDataset) -> dict[str, float]:
    """The task's held-out metrics (``accuracy`` is its primary one) on the compute device."""
    return task_of(cfg.model).evaluate(model, data, device=models.select_device(), precision=cfg.model.precision,
                                       num_labels=len(cfg.data.label_list), cfg=cfg.model)


class Scorer:
    """The server's model for a global adapter: one PEFT model per global rank (``stack`` grows it
    every round), loaded with the state it is asked to score. Used by the ServerApp and ``inprocess``."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._models: dict[int, adapters.PeftModel] = {}

    def from_saved(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved PEFT checkpoint's tensors as an adapter state (the answer head saves A = V M and its
        selector, what plain peft reads; ``fedpeft.methods.answer_head``)."""
        if not self.cfg.adapter.answer_head:
            return dict(tensors)
        from fedpeft.methods import answer_head

        acfg = global_adapter_config(self.cfg)
        if acfg.rank not in self._models:
            self._models[acfg.rank] = build_model(self.cfg, dp=False, adapter=acfg)
        return answer_head.from_saved(self._models[acfg.rank], tensors)

    def __call__(self, state: Mapping[str, torch.Tensor]) -> adapters.PeftModel:
        acfg = global_adapter_config(self.cfg, state)
        if acfg.rank not in self._models:
            self._models[acfg.rank] = build_model(self.cfg, dp=False, adapter=acfg)
        model = self._models[acfg.rank]
        adapters.set_adapter_state(model, state)
        return model
