"""ClientApp: read the site's node config, call fedpeft, reply with the adapter delta only."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config import RunConfig, from_run_config
from fedpeft.federation import ARRAYS, CONFIG, METRICS, from_arrays, metric_record, to_arrays
from fedpeft.privacy.store import load_state_json, save_state_json
from fedpeft.site import check_noise_source, site_evaluate, site_train
from fedpeft.runtime import quiet_libraries, set_threads

app = ClientApp()
PRIVACY_KEY = "fedpeft-privacy"


def _setup(msg: Message, context: Context) -> tuple[RunConfig, int, int, str | None]:
    """Run config from the server's message; (site id, number of sites, optional local data file)
    from the SuperNode's node config."""
    quiet_libraries()
    cfg = from_run_config(dict(msg.content[CONFIG]))
    set_threads(cfg.federation.client_cpus)
    nc = context.node_config
    # Flower's Simulation Engine gives every virtual node a partition-id; a real SuperNode does not.
    check_noise_source(cfg, deployed="partition-id" not in nc)
    site = int(nc.get("site-id", nc.get("partition-id", 0)))
    num = int(nc.get("num-partitions", site + 1))
    path = nc.get("data-path")
    return cfg, site, num, (str(path) if path else None)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, site, num, path = _setup(msg, context)
    # Prepare: privacy state travels in context.state (and in node config's state-dir, if set)
    # so epsilon accumulates across rounds and restarts
    state_dir = context.node_config.get("state-dir")
    prev = context.state.config_records.get(PRIVACY_KEY)
    prev_json = str(prev["state"]) if prev else (load_state_json(str(state_dir), site) if state_dir else None)
    delta, metrics, privacy_json = site_train(
        cfg, site=site, num_sites=num, server_round=int(msg.content[CONFIG]["server-round"]),
        global_state=from_arrays(msg.content[ARRAYS]), privacy_json=prev_json, data_path=path,
    )
    if privacy_json is not None:
        context.state[PRIVACY_KEY] = ConfigRecord({"state": privacy_json})
        if state_dir:
            save_state_json(str(state_dir), site, privacy_json)
    return Message(RecordDict({ARRAYS: to_arrays(delta), METRICS: metric_record(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, site, num, path = _setup(msg, context)
    metrics = site_evaluate(cfg, site=site, num_sites=num, global_state=from_arrays(msg.content[ARRAYS]),
                            data_path=path)
    return Message(RecordDict({METRICS: metric_record(metrics)}), reply_to=msg)
