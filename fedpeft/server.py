"""Server side of a run: strategy start, server-side evaluation, per-round checkpoints,
``metrics.json`` (rewritten atomically every round), final PEFT-format adapter and plots."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedpeft import adapters, checkpoint, models
from fedpeft.config import SYNTHETIC, RunConfig
from fedpeft.data.sites import global_test_examples, make_site, split_counts
from fedpeft.factory import Scorer, base_model, dataset, evaluate, finish_adapter, initial_adapter_state
from fedpeft.federation import config_record, from_arrays, to_arrays
from fedpeft.io import atomic_write_json
from fedpeft.runconfig import from_run_config, to_run_config
from fedpeft.strategy import DeltaMerge, RoundLog, make_strategy
from fedpeft.tasks import task_of

log = logging.getLogger(__name__)
MAX_SPLIT_SITES = 40  # the split plot stays readable; 1,000-site runs plot the first 40


class RunRecorder:
    """Accumulates per-round metrics and rewrites metrics.json atomically after each round."""

    def __init__(self, out: Path, cfg: RunConfig, *, adapter_bytes: int, full_model_bytes: int,
                 precision: str) -> None:
        self.out = out
        self.t0 = time.time()
        self.data: dict[str, Any] = {
            "config": to_run_config(cfg), "adapter_bytes": adapter_bytes, "full_model_bytes": full_model_bytes,
            "labels": cfg.data.label_list, "precision": precision, "dp_noise": noise_statement(cfg),
            "task": cfg.model.task, "metric_label": task_of(cfg.model).metric_label, "rounds": [],
        }

    def resume_from(self, path: Path, done: int) -> None:
        """Keep the rows of rounds 0..done from an interrupted run's metrics.json."""
        if path.exists():
            old = json.loads(path.read_text())
            self.data["rounds"] = [r for r in old.get("rounds", []) if r["round"] <= done]
            self.t0 -= float(old.get("wall_s", 0.0))
        self.data["resumed_after"] = done

    def record(self, rnd: int, ev: Mapping[str, float], rlog: RoundLog | None) -> None:
        row: dict[str, Any] = {"round": rnd, "global": {k.replace("-", "_"): v for k, v in ev.items()
                                                         if k not in ("examples", "generated")}}
        if rlog is not None:
            sites: dict[str, dict[str, Any]] = {}
            for s, m in rlog.train.items():
                sites.setdefault(str(s), {}).update(
                    {"epsilon": m.get("epsilon", 0.0), "train_loss": m.get("train-loss"),
                     "local_accuracy": m.get("local-accuracy"),
                     "precision": "bfloat16" if m.get("bfloat16") else "float32",
                     "bytes_up": m.get("bytes-up"), "steps": m.get("steps"), "num_examples": m.get("num-examples")})
            for s, m in rlog.evaluate.items():
                sites.setdefault(str(s), {}).update({"accuracy": m.get("accuracy"), "eval_loss": m.get("loss")})
            row.update({
                "sites": dict(sorted(sites.items(), key=lambda kv: int(kv[0]))),
                "bytes_up": int(sum(m.get("bytes-up", 0.0) for m in rlog.train.values())),
                "bytes_down": rlog.bytes_down, "rejected": rlog.rejected, "failures": rlog.failures,
                "skipped": rlog.skipped,
                "declined": {str(k): v for k, v in sorted(rlog.declined.items())},
                "merged": {str(k): v for k, v in sorted(rlog.merged.items())},
                "client_epsilon": rlog.client_epsilon, "retries": rlog.retries,
                "ranks": {str(k): v for k, v in sorted(rlog.ranks.items())},
                "dropped_energy": rlog.dropped_energy,
            })
        self.data["wall_s"] = row["elapsed_s"] = time.time() - self.t0  # per row: where the time went
        self.data["rounds"].append(row)
        atomic_write_json(self.out / "metrics.json", self.data)


def noise_statement(cfg: RunConfig) -> dict[str, str]:
    """How the sites' DP noise was drawn, in the words a privacy officer needs."""
    if not cfg.privacy.enabled:
        return {"source": "none", "statement": "no DP: no noise"}
    if cfg.privacy.noise == "seeded":
        return {"source": "seeded", "statement": "reproducible by anyone with the run seed — no protection "
                "against the coordinator (simulation only)"}
    return {"source": "secret", "statement": "each site seeds its noise and sampling from its own operating "
            "system's entropy; nobody else can reproduce them"}


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]federated rounds"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.description}"), TimeElapsedColumn(), transient=False)


def _connected_nodes(grid: Grid, expected: int, *, wait_s: float = 10.0) -> int:
    """SuperNodes connected now, waiting up to ``wait_s`` for ``expected`` of them: the simulation
    engine registers its virtual nodes while the ServerApp starts, so a first count can be short."""
    deadline = time.monotonic() + wait_s
    while True:
        nodes = len(list(grid.get_node_ids()))
        if nodes >= expected or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.1)


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run the whole federation described by ``run_config``; return the metrics dict."""
    cfg = from_run_config(dict(run_config))
    out = Path(cfg.federation.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = cfg.data.label_list
    device = models.select_device()

    nodes = _connected_nodes(grid, cfg.federation.num_sites)
    if nodes and nodes != cfg.federation.num_sites:  # `flwr run` sizes the federation separately
        log.warning("num-sites=%d but %d SuperNodes are connected; sites use their own node config "
                    "(with `flwr run`, pass --federation-config \"num-supernodes=%d\")",
                    cfg.federation.num_sites, nodes, cfg.federation.num_sites)
    # Prepare: global adapter, server-side test set, strategy
    init = initial_adapter_state(cfg)
    scorer = Scorer(cfg)

    test_ds = dataset(cfg, *global_test_examples(cfg.data, seed=cfg.train.seed, num_sites=cfg.federation.num_sites,
                                                 task=cfg.model.task))
    strategy: DeltaMerge = make_strategy(cfg)
    strategy.policy.finish = functools.partial(finish_adapter, cfg, scorer)
    precision = models.resolve_precision(cfg.model.precision, device)
    log.info("compute precision: %s (precision=%r on %s)", precision, cfg.model.precision, device)
    rec = RunRecorder(out, cfg, adapter_bytes=adapters.state_bytes(init),
                      full_model_bytes=models.model_bytes(base_model(cfg)), precision=precision)
    meta = {"labels": labels, "model": cfg.model.name, "model-layers": cfg.model.layers,
            "pooling": cfg.model.pooling, "adapter": cfg.adapter.method, "merge": cfg.federation.merge,
            "lora-ranks": cfg.adapter.rank_list, "task": cfg.model.task, "model-seed": cfg.model.seed,
            "lora-rank": cfg.adapter.rank, "lora-layers": cfg.adapter.layers}
    # Resume: continue after the last committed round (adapter, strategy moments, RNG, metrics)
    done = 0
    saved = checkpoint.load_server_state(out) if cfg.federation.resume else None
    if saved is not None:
        done = int(saved["round"])
        init = scorer.from_saved(checkpoint.restore(out, saved, strategy))
        strategy.round_offset = done
        rec.resume_from(out / "metrics.json", done)
        log.info("resuming after round %d of %d from %s", done, cfg.federation.num_rounds, out)
    progress = _progress()
    task = progress.add_task("", total=cfg.federation.num_rounds, completed=done)
    last_energy: dict[str, Any] = {}

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        model = scorer(from_arrays(arrays))
        ev = evaluate(cfg, model, test_ds)
        reported = MetricRecord({k: v for k, v in ev.items() if k not in ("examples", "generated")})
        rnd += done
        if rnd == done and done > 0:  # the resumed-from round is already recorded and committed
            return reported
        rlog = strategy.rounds.get(rnd)
        energy = {"dropped-energy": rlog.dropped_by_module} if rlog is not None and rlog.dropped_by_module else {}
        last_energy.update(energy)  # the global adapter records what truncation dropped, per module
        adapters.save_adapter(model, out / "checkpoints" / f"round-{rnd:03d}",
                              metadata={**meta, "round": rnd, **energy})
        rec.record(rnd, ev, strategy.rounds.get(rnd))
        checkpoint.save_server_state(out, rnd, strategy)  # the commit point of the round
        log.info("round %d: global accuracy %.4f loss %.4f", rnd, ev["accuracy"], ev["loss"])
        if rnd > 0:
            progress.update(task, advance=1, description=f"acc {ev['accuracy']:.3f}")
        return reported

    # Execute
    flat = to_run_config(cfg)
    with progress:  # two records: Flower writes "server-round" into each
        result = strategy.start(grid=grid, initial_arrays=to_arrays(init), num_rounds=cfg.federation.num_rounds - done,
                                train_config=config_record(flat), evaluate_config=config_record(flat),
                                evaluate_fn=evaluate_fn, timeout=cfg.federation.round_timeout or 86400.0)

    # Export: final adapter in PEFT format, plots
    final = from_arrays(result.arrays) if len(result.arrays) else init  # every round skipped: keep round 0
    from fedpeft.modelcard import card_for_run

    adapters.save_adapter(scorer(final), out / "adapter", metadata={**meta, **last_energy},
                          card=card_for_run(cfg, rec.data["rounds"], labels))
    try:
        write_plots(out, rec.data, cfg)
    except Exception as e:  # a plot must never lose the run's results
        log.warning("plots failed: %s", e)
    return rec.data


def write_plots(out: Path, metrics: dict[str, Any], cfg: RunConfig) -> None:
    from fedpeft import plots

    n = min(cfg.federation.num_sites, MAX_SPLIT_SITES)
    if cfg.data.source in SYNTHETIC:
        sites = [make_site(s, cfg.federation.num_sites, cfg.data, seed=cfg.train.seed, task=cfg.model.task)
                 for s in range(n)]
        plots.plot_split(split_counts(sites, len(cfg.data.label_list)), cfg.data.label_list,
                         [s.name for s in sites], out / "plots" / "split.png")
    plots.plot_accuracy(metrics, out / "plots" / "accuracy.png")
    if all("perplexity" in r["global"] for r in metrics["rounds"]):
        plots.plot_perplexity(metrics, out / "plots" / "perplexity.png")
    plots.plot_epsilon(metrics, out / "plots" / "epsilon.png", target=cfg.privacy.target_epsilon
                       if cfg.privacy.enabled else None)
