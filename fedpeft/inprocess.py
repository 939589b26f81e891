"""A federation in one process, without Flower or Ray: every site's round runs here in turn,
through the same ``site_train``/``site_evaluate`` and the same registered merge as the apps.

For benchmarks and device checks (pfl-research's single-worker loop): it has no message layer, so it
measures the site-side work alone, and it runs where Flower is not installed (the GPU kit). Sites
are all sampled every round; Flower's strategies, reply validation and checkpoints are the apps' job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedpeft import adapters, compression, factory, models, site
from fedpeft.aggregation import create_merge
from fedpeft.config import RunConfig
from fedpeft.data.sites import global_test_examples
from fedpeft.merging import merge_replies
from fedpeft.privacy.vault import site_folder
from fedpeft.reply import Reply

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    round: int
    seconds: float  # the sites' training and the merge (evaluation excluded)
    accuracy: float  # global adapter on the server's test set
    sites: dict[int, dict[str, float]] = field(default_factory=dict)
    merge_seconds: float = 0.0  # the server's merge alone
    bytes_down: int = 0  # the global adapter sent to every site


def run_federation(cfg: RunConfig, *, on_round: Callable[[RoundResult], None] | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[RoundResult]]:
    """Run ``cfg.federation.num_rounds`` rounds over ``num_sites`` sites; return the final global
    adapter and one ``RoundResult`` per round (round 0 is the initial adapter)."""
    n = cfg.federation.num_sites
    merge = create_merge(cfg.federation.merge) if cfg.rank_rule is None else None
    device = models.select_device()
    glob = factory.initial_adapter_state(cfg)
    test = factory.dataset(cfg, *global_test_examples(cfg.data, seed=cfg.train.seed, num_sites=n, task=cfg.model.task))
    scorer = factory.Scorer(cfg)  # the ServerApp's scorer

    def score(state: dict[str, torch.Tensor]) -> float:
        return factory.evaluate(cfg, scorer(state), test)["accuracy"]

    results = [RoundResult(0, 0.0, score(glob))]
    privacy: dict[int, str | None] = {}
    for rnd in range(1, cfg.federation.num_rounds + 1):
        t0 = time.perf_counter()
        replies, per_site = [], {}
        for s in range(n):
            folder = site_folder(None, out_dir=cfg.federation.out_dir, site=s, deployed=False)
            delta, metrics, privacy[s] = site.site_train(cfg, site=s, num_sites=n, server_round=rnd, state_dir=folder,
                                                         global_state=glob, privacy_json=privacy.get(s))
            replies.append(Reply("trained", compression.decode(delta, cfg.federation.delta_format), metrics))
            per_site[s] = metrics
        bytes_down = n * adapters.state_bytes(glob)
        tm = time.perf_counter()  # the strategy's merge, on the same replies in the same order
        glob, _ = merge_replies(glob, replies, merge_fn=merge, rank_cfg=cfg if cfg.rank_rule else None)
        merge_s = time.perf_counter() - tm
        if rnd == cfg.federation.num_rounds:  # as the ServerApp's strategy: the released adapter
            glob = factory.finish_adapter(cfg, scorer, glob)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res = RoundResult(rnd, time.perf_counter() - t0, score(glob), per_site, merge_s, bytes_down)
        results.append(res)
        log.info("round %d: %.1f s, global accuracy %.4f", rnd, res.seconds, res.accuracy)
        if on_round is not None:
            on_round(res)
    return glob, results
