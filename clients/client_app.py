"""ClientApp: read the site's node config, call fedpeft, reply with the adapter delta only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

# Light imports only (no torch): Flower starts a ClientApp process per message on a SuperNode, and a
# site that refuses the run (its policy, its task, its labels) answers before the model stack loads.
from fedpeft.config import RunConfig
from fedpeft.data.sites import simulated_site
from fedpeft.imports import gc_paused
from fedpeft.policy import apply_node_config
from fedpeft.records import ARRAYS, CONFIG, METRICS, SECAGG, STATUS
from fedpeft.runconfig import from_run_config

if TYPE_CHECKING:
    from fedpeft.privacy.vault import SiteVault

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, int, str | None]:
    """Run config from the server's message; (site id, number of sites, optional local data file)
    from the SuperNode's node config."""
    cfg = from_run_config(dict(msg.content[CONFIG]))
    nc = context.node_config
    # Flower's Simulation Engine gives every virtual node a partition-id; a real SuperNode does not.
    # A deployed site's own columns and privacy policy: a run config asking for less is refused.
    cfg = apply_node_config(cfg, nc, deployed="partition-id" not in nc)
    with gc_paused():  # the model stack (~4,000 modules), once the site takes part
        import fedpeft.federation  # noqa: F401
        import fedpeft.secagg.site  # noqa: F401
        import fedpeft.site  # noqa: F401
        from fedpeft.runtime import quiet_libraries, set_threads
    quiet_libraries()
    set_threads(cfg.federation.client_cpus)
    if "site-id" in nc:  # a deployed site names itself
        site = int(nc["site-id"])
        num = int(nc.get("num-partitions", site + 1))
    else:  # a virtual node of the Simulation Engine: largest sites first (see simulated_site)
        num = int(nc.get("num-partitions", 1))
        site = simulated_site(int(nc.get("partition-id", 0)), num, cfg.data, seed=cfg.train.seed)
    path = nc.get("data-path")
    return cfg, site, num, (str(path) if path else None)


def _vault(context: Context, cfg: RunConfig, site: int, deployed: bool) -> SiteVault:
    from fedpeft.privacy.vault import SiteVault, site_folder

    state_dir = context.node_config.get("state-dir")
    return SiteVault(site_folder(str(state_dir) if state_dir else None, out_dir=cfg.federation.out_dir,
                                 site=site, deployed=deployed), site)


def _node_rank(context: Context) -> int | None:
    """A deployed site's own LoRA rank (node config ``lora-rank``); else the run's cycling rule."""
    r = context.node_config.get("lora-rank")
    return int(r) if r is not None else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, site, num, path = _setup(msg, context)
    from fedpeft.federation import from_arrays, metric_record, status_record, to_arrays
    from fedpeft.secagg import site as secagg_site
    from fedpeft.secagg.ddp import DdpPlan
    from fedpeft.site import round_seed, site_round

    deployed = "partition-id" not in context.node_config
    # Execute: privacy state and ledger live in the site's folder, so epsilon accumulates across
    # rounds and SuperNode restarts
    config = msg.content.config_records[CONFIG]
    seal = None
    if "secagg-participants" in config:  # secure aggregation: the delta leaves masked (fedpeft.secagg)
        vault = _vault(context, cfg, site, deployed)
        participants = json.loads(str(config["secagg-participants"]))
        rnd = int(config["server-round"])  # type: ignore[arg-type]
        plan = None
        if cfg.privacy.client_dp:  # distributed DP: this site adds its share of the noise
            p = cfg.privacy
            plan = DdpPlan(noise_multiplier=p.client_noise_multiplier, clip=p.client_clip, delta=p.target_delta)
        seed = round_seed(cfg.train.seed, site, rnd) ^ 0xDD if cfg.privacy.noise == "seeded" else None
        seal = secagg_site.Sealer(vault, rnd, participants, plan=plan, seed=seed)
    reply = site_round(cfg, site=site, num_sites=num, server_round=int(config["server-round"]),  # type: ignore[arg-type]
                       global_state=from_arrays(msg.content.array_records[ARRAYS]),
                       vault=(_vault(context, cfg, site, deployed)
                              if cfg.privacy.enabled or deployed or seal is not None else None),
                       data_path=path, deployed=deployed, rank=_node_rank(context),
                       attempt=int(config.get("attempt", 0)), seal=seal)  # type: ignore[arg-type]
    content = RecordDict({METRICS: metric_record(reply.metrics), STATUS: status_record(reply)})
    if reply.delta is not None:
        content[ARRAYS] = to_arrays(reply.delta)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, site, num, path = _setup(msg, context)
    from fedpeft.federation import from_arrays, metric_record, status_record
    from fedpeft.site import settle_ledger, site_evaluate

    metrics = site_evaluate(cfg, site=site, num_sites=num, global_state=from_arrays(msg.content.array_records[ARRAYS]),
                            data_path=path)
    content = RecordDict({METRICS: metric_record(metrics)})
    if cfg.privacy.enabled:  # a crash in training left steps unsigned: sign them now, send the ledger
        deployed = "partition-id" not in context.node_config
        reply = settle_ledger(cfg, _vault(context, cfg, site, deployed), deployed=deployed)
        if reply is not None:
            content[STATUS] = status_record(reply)
    return Message(content, reply_to=msg)


def _secagg(msg: Message, context: Context) -> tuple[RunConfig, SiteVault, int, dict]:
    cfg, site, _, _ = _setup(msg, context)
    deployed = "partition-id" not in context.node_config
    rec = dict(msg.content.config_records[SECAGG])
    return cfg, _vault(context, cfg, site, deployed), int(rec["server-round"]), rec  # type: ignore[arg-type]


def _roster(context: Context, cfg: RunConfig, sites: list[int]) -> dict[int, str]:
    """The peers' ledger keys: a deployed site's roster file (node config secagg-roster); in a
    simulation, each virtual site's own ledger (all parties on one machine: a stand-in)."""
    from fedpeft.secagg import site as secagg_site
    from fedpeft.secagg.protocol import SecAggError

    path = context.node_config.get("secagg-roster")
    if path:
        return secagg_site.load_roster(str(path))
    if "partition-id" not in context.node_config:  # a deployed site has no peers' folders to read
        raise SecAggError("secure-aggregation=true: this site has no roster of its peers' ledger keys ([secagg] "
                          "roster in its config; `fedpeft roster KEYS` makes one), so it cannot check their keys "
                          "and does not take part")
    return secagg_site.simulation_roster(Path(cfg.federation.out_dir) / "sites", sites)


@app.query("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Stage 1: this round's signed key advert."""
    from fedpeft.secagg import site as secagg_site

    _, vault, rnd, _ = _secagg(msg, context)
    with vault.exclusive():
        advert = secagg_site.advertise_keys(vault, rnd)
    return Message(RecordDict({SECAGG: ConfigRecord({"advert": advert})}), reply_to=msg)


@app.query("secagg_shares")
def secagg_shares(msg: Message, context: Context) -> Message:
    """Stage 2: check the relayed adverts against the roster; encrypted shares for each peer."""
    from fedpeft.secagg import site as secagg_site
    from fedpeft.secagg import wire as secagg_wire

    cfg, vault, rnd, rec = _secagg(msg, context)
    adverts = json.loads(str(rec["adverts"]))
    roster = _roster(context, cfg, [int(json.loads(a)["site"]) for a in adverts])
    with vault.exclusive():
        shares = secagg_site.share_keys(vault, rnd, adverts, roster, int(rec["threshold"]),
                                        fraction=cfg.federation.secagg_threshold,
                                        min_sites=cfg.federation.min_train_sites)
    return Message(RecordDict({SECAGG: ConfigRecord(secagg_wire.shares_record(shares))}), reply_to=msg)


@app.query("secagg_reveal")
def secagg_reveal(msg: Message, context: Context) -> Message:
    """Stage 4: shares of the survivors' seeds and of the dropped sites' keys, never both."""
    from fedpeft.secagg import site as secagg_site
    from fedpeft.secagg import wire as secagg_wire

    _, vault, rnd, rec = _secagg(msg, context)
    with vault.exclusive():
        got = secagg_site.reveal_shares(vault, rnd, secagg_wire.read_shares(rec, prefix="inbox"),
                                        json.loads(str(rec["survivors"])), json.loads(str(rec["dropped"])))
    return Message(RecordDict({SECAGG: ConfigRecord(secagg_wire.reveal_record(got))}), reply_to=msg)


@app.query("secagg_vector")
def secagg_vector(msg: Message, context: Context) -> Message:
    """Stage 3b: the kept update at the step the range sum gave, masked, and the ledger line binding it."""
    from fedpeft.secagg import site as secagg_site
    from fedpeft.secagg.span import Bits

    _, vault, rnd, rec = _secagg(msg, context)
    bits = Bits(int(rec["ring-bits"]), int(rec["frac-bits"]), int(rec["weight-frac-bits"]))
    with vault.exclusive():
        masked, line = secagg_site.send_vector(vault, rnd, bits)
    return Message(RecordDict({SECAGG: ConfigRecord({"masked": masked, "ledger-entry": line})}), reply_to=msg)
