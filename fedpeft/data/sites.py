"""Per-site data for simulations: non-IID by label (Dirichlet), quantity (log-normal) and style.

Synthetic notes are generated per site from (seed, site) alone, so a virtual client never needs
the other sites' data and 1,000 sites cost nothing up front. Pooled file data is split with
flwr-datasets' ``DirichletPartitioner``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedpeft.config import DataConfig
from fedpeft.data.instructions import generate_referrals, load_instructions
from fedpeft.data.loaders import load_labelled_texts
from fedpeft.data.notes import LABELS, class_mix, generate_notes, site_style

MIN_SITE_NOTES = 16


@dataclass
class SiteData:
    """A site's examples. Generative tasks: texts are prompts, targets the responses, labels the
    class each example is about (the referral's specialty; 0 when files carry none)."""

    site: int
    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    train_targets: list[str] = field(default_factory=list)
    test_targets: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def site_sizes(*, num_sites: int, mean: int, sigma: float, seed: int) -> np.ndarray:
    """Quantity skew: log-normal sizes rescaled to the requested mean (at least MIN_SITE_NOTES).
    Read-only and memoised: every site of a 100,000-site run asks for its own entry."""
    if sigma == 0:
        out = np.full(num_sites, max(mean, MIN_SITE_NOTES))
    else:
        rng = np.random.default_rng([seed, 7919])
        raw = rng.lognormal(0.0, sigma, size=num_sites)
        out = np.maximum(np.round(raw / raw.mean() * mean), MIN_SITE_NOTES).astype(int)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=8)
def _largest_first(num_sites: int, mean: int, sigma: float, seed: int) -> np.ndarray:
    """Site ids by size, largest first, ties by id (a stable sort of -size), memoised."""
    order = np.argsort(-site_sizes(num_sites=num_sites, mean=mean, sigma=sigma, seed=seed), kind="stable")
    order.setflags(write=False)
    return order


def simulated_site(partition_id: int, num_sites: int, cfg: DataConfig, *, seed: int) -> int:
    """The site a simulation's virtual node plays: node i plays the i-th largest site.

    Flower's Simulation Engine queues a round's messages in node order and each Ray worker takes the
    next one when it is free, so handing out the largest sites first packs the workers evenly
    (longest-processing-time-first scheduling; ~10 % off the default run's wall time). Every site
    is still played by exactly one node. Sizes are known up front only for the generator.
    """
    if cfg.source not in ("notes", "referrals") or cfg.quantity_skew == 0 or not 0 <= partition_id < num_sites:
        return partition_id
    return int(_largest_first(num_sites, cfg.notes_per_site, cfg.quantity_skew, seed)[partition_id])


def make_site(site: int, num_sites: int, cfg: DataConfig, *, seed: int, data_path: str | None = None,
              task: str = "classification") -> SiteData:
    """The data of one site. ``data_path`` (from the node config) points at the site's own file."""
    if not data_path and "{site}" in cfg.source:  # one file per site: data="sites/site{site}.csv"
        data_path = cfg.source.format(site=site)
    if data_path:
        if task == "causal-lm":
            return _instruction_site(site, Path(data_path), seed=seed)
        return _file_site(site, Path(data_path), cfg, seed=seed)
    if cfg.source not in ("notes", "referrals"):
        if task == "causal-lm":
            return _pooled_instruction_site(site, num_sites, cfg, seed=seed)
        return _pooled_site(site, num_sites, cfg, seed=seed)
    style = site_style(site)
    n = int(site_sizes(num_sites=num_sites, mean=cfg.notes_per_site, sigma=cfg.quantity_skew, seed=seed)[site])
    mix = class_mix(np.random.default_rng(hash_seed(seed, site, 0)), style, cfg.dirichlet_alpha)
    name = f"site{site:02d} ({style.name})"
    if cfg.source == "referrals":  # the same notes, asked for the specialty and the reason
        tp, ty, tr = generate_referrals(n=n, seed=hash_seed(seed, site, 1), style=style, mix=mix,
                                        label_noise=cfg.label_noise)
        ep, ey, er = generate_referrals(n=cfg.test_per_site, seed=hash_seed(seed, site, 2), style=style, mix=mix)
        return SiteData(site, name, tp, ty, ep, ey, tr, er)
    train = generate_notes(n=n, seed=hash_seed(seed, site, 1), style=style, mix=mix, label_noise=cfg.label_noise)
    test = generate_notes(n=cfg.test_per_site, seed=hash_seed(seed, site, 2), style=style, mix=mix)
    return SiteData(site, name, *train, *test)


def _instruction_site(site: int, path: Path, *, seed: int) -> SiteData:
    prompts, responses = load_instructions(path)
    idx = np.random.default_rng(hash_seed(seed, site, 4)).permutation(len(prompts))
    n_test = int(round(len(prompts) * 0.2))
    te, tr = idx[:n_test], idx[n_test:]
    return SiteData(site, f"site{site:02d} ({path.name})", [prompts[i] for i in tr], [0] * len(tr),
                    [prompts[i] for i in te], [0] * len(te), [responses[i] for i in tr], [responses[i] for i in te])


@functools.lru_cache(maxsize=2)
def _instructions_cached(source: str) -> tuple[list[str], list[str]]:
    return load_instructions(source)


def _pooled_instruction_site(site: int, num_sites: int, cfg: DataConfig, *, seed: int) -> SiteData:
    """A pooled instruction file: 10 % held out for the server, the rest dealt to the sites at random
    (instruction rows carry no label to skew by)."""
    prompts, responses = _instructions_cached(cfg.source)
    idx = np.random.default_rng(hash_seed(seed, 10**6, 5)).permutation(len(prompts))
    mine = idx[max(1, len(prompts) // 10):][site::num_sites]
    n_test = int(round(len(mine) * 0.2))
    te, tr = mine[:n_test], mine[n_test:]
    return SiteData(site, f"site{site:02d}", [prompts[i] for i in tr], [0] * len(tr), [prompts[i] for i in te],
                    [0] * len(te), [responses[i] for i in tr], [responses[i] for i in te])


def hash_seed(seed: int, site: int, part: int) -> int:
    return int(np.random.SeedSequence([seed, site, part]).generate_state(1)[0])


def global_test_set(cfg: DataConfig, *, seed: int, num_sites: int = 1) -> tuple[list[str], list[int]]:
    """Server-side held-out set: balanced classes, every site style mixed, no label noise."""
    texts, labels, _ = global_test_examples(cfg, seed=seed, num_sites=num_sites)
    return texts, labels


def global_test_examples(cfg: DataConfig, *, seed: int, num_sites: int = 1, task: str = "classification"
                         ) -> tuple[list[str], list[int], list[str]]:
    """``global_test_set`` with the responses of a generative task (texts, labels, targets)."""
    if "{site}" in cfg.source:  # simulation with per-site files: the union of their held-out splits
        texts, labels, targets = [], [], []
        for site in range(num_sites):
            try:
                d = make_site(site, num_sites, cfg, seed=seed, task=task)
            except (OSError, ValueError):
                continue  # that site's own run reports the error
            texts += d.test_texts
            labels += d.test_labels
            targets += d.test_targets
        return texts, labels, targets
    if cfg.source == "referrals":
        return generate_referrals(n=cfg.global_test_size, seed=hash_seed(seed, 10**6, 3))
    if cfg.source != "notes":
        if task == "causal-lm":
            prompts, responses = _instructions_cached(cfg.source)
            idx = np.random.default_rng(hash_seed(seed, 10**6, 5)).permutation(len(prompts))[:max(1, len(prompts) // 10)]
            return [prompts[i] for i in idx], [0] * len(idx), [responses[i] for i in idx]
        return (*_pool_split(cfg, seed=seed)[1], [])
    return (*generate_notes(n=cfg.global_test_size, seed=hash_seed(seed, 10**6, 3)), [])


def _split(texts: list[str], labels: list[int], *, seed: int, test_fraction: float = 0.2) -> tuple:
    idx = np.random.default_rng(seed).permutation(len(texts))
    n_test = int(round(len(texts) * test_fraction))
    te, tr = idx[:n_test], idx[n_test:]
    return [texts[i] for i in tr], [labels[i] for i in tr], [texts[i] for i in te], [labels[i] for i in te]


def _file_site(site: int, path: Path, cfg: DataConfig, *, seed: int) -> SiteData:
    texts, labels = load_labelled_texts(path, labels=cfg.label_list, text_column=cfg.text_column,
                                        label_column=cfg.label_column)
    return SiteData(site, f"site{site:02d} ({path.name})", *_split(texts, labels, seed=hash_seed(seed, site, 4)))


@functools.lru_cache(maxsize=2)
def _pool_cached(source: str, labels: tuple[str, ...], text_col: str, label_col: str) -> tuple[list[str], list[int]]:
    return load_labelled_texts(source, labels=list(labels), text_column=text_col, label_column=label_col)


def _pool(source: str, cfg: DataConfig) -> tuple[list[str], list[int]]:
    return _pool_cached(source, tuple(cfg.label_list), cfg.text_column, cfg.label_column)


def _pool_split(cfg: DataConfig, *, seed: int) -> tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """A pooled file split once: 90 % for the sites to partition, 10 % held out for the server."""
    texts, labels = _pool(cfg.source, cfg)
    idx = np.random.default_rng(hash_seed(seed, 10**6, 5)).permutation(len(texts))
    n_test = max(1, len(texts) // 10)
    pick = lambda ids: ([texts[i] for i in ids], [labels[i] for i in ids])  # noqa: E731
    return pick(idx[n_test:]), pick(idx[:n_test])


def _pooled_site(site: int, num_sites: int, cfg: DataConfig, *, seed: int) -> SiteData:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    (texts, labels), _ = _pool_split(cfg, seed=seed)
    part = DirichletPartitioner(num_partitions=num_sites, partition_by="label", alpha=cfg.dirichlet_alpha,
                                seed=seed, min_partition_size=0, self_balancing=True)
    part.dataset = Dataset.from_dict({"text": texts, "label": labels})
    p = part.load_partition(site)
    return SiteData(site, f"site{site:02d}", *_split(list(p["text"]), list(p["label"]), seed=hash_seed(seed, site, 4)))


def split_counts(sites: list[SiteData], num_labels: int = len(LABELS)) -> np.ndarray:
    """classes x sites matrix of training-example counts."""
    out = np.zeros((num_labels, len(sites)), dtype=int)
    for j, s in enumerate(sites):
        for y in s.train_labels:
            out[y, j] += 1
    return out
