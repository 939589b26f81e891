"""A deployed site's privacy policy is its own: a run config asking for less is refused, naming
the key; only the site's file turns DP off, and then its reply and ledger say so."""

from __future__ import annotations

import json

import pytest

from fedpeft.factory import initial_adapter_state
from fedpeft.policy import PolicyError, SitePolicy, apply_node_config
from fedpeft.privacy.ledger import verify_file
from fedpeft.privacy.vault import SiteVault
from fedpeft.runconfig import from_run_config
from fedpeft.site import site_round

TINY = {"model": "tiny", "lora-layers": "", "lr": 0.01, "notes-per-site": 40, "test-per-site": 10,
        "num-server-rounds": 2, "batch-size": 16}
SITE_FILE = {"site-id": 0, "dp": "true", "target-epsilon": 6.0, "target-delta": 1e-5}  # `fedpeft site` writes these


@pytest.mark.parametrize("run, key", [
    ({"dp": False}, "dp=false"),
    ({"target-epsilon": 8.0}, "target-epsilon=8"),
    ({"target-epsilon": 6.0, "target-delta": 1e-3}, "target-delta=0.001"),
    ({"target-epsilon": 6.0, "dp-noise": "seeded"}, "dp-noise='seeded'"),
    ({"target-epsilon": 6.0, "audit-canaries": 100}, "audit-canaries=100"),
    ({"target-epsilon": 6.0, "task": "causal-lm", "model": "tiny-llama", "data": "referrals",  # could be the
      "lora-target-modules": "q_proj", "answer-head": True, "answer-choices": "A,B",  # site's own records
      "answer-head-calibration": "/data/site-0.jsonl"}, "answer-head-calibration='/data/site-0.jsonl'"),
])
def test_a_deployed_site_refuses_a_run_config_that_asks_for_less(run, key):
    cfg = from_run_config({**TINY, **run})
    with pytest.raises(PolicyError, match=rf"^{key}.*refused"):
        apply_node_config(cfg, SITE_FILE, deployed=True)
    # a simulation plays every party: the same config is the researcher's to choose
    assert apply_node_config(cfg, SITE_FILE, deployed=False) == cfg


REFUSAL_WITHOUT_TORCH = """
import json, sys
from types import SimpleNamespace
from flwr.app import ConfigRecord, Context, RecordDict
import clients.client_app as app
from fedpeft.runconfig import from_run_config, to_run_config
flat = {**to_run_config(from_run_config(json.loads(sys.argv[1]))), "server-round": 1}
msg = SimpleNamespace(content={"config": ConfigRecord(flat)})
ctx = Context(run_id=1, node_id=1, node_config=json.loads(sys.argv[2]), state=RecordDict(), run_config={})
try:
    app.train(msg, ctx)
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
torch_before = "torch" in sys.modules
virtual = Context(run_id=1, node_id=2, node_config={"partition-id": 0, "num-partitions": 1}, state=RecordDict(),
                  run_config={})
app._setup(msg, virtual)  # a simulation's virtual node may run without DP: it loads the stack
import gc
print(json.dumps({"error": error, "torch": torch_before, "torch_after": "torch" in sys.modules,
                  "gc": gc.isenabled()}))
"""


def test_a_client_app_process_refuses_a_weaker_run_before_it_imports_torch():
    """A SuperNode starts one ClientApp process per message: a refusal should cost no model stack."""
    import subprocess
    import sys
    from pathlib import Path

    # Prepare / Execute: a fresh interpreter, as Flower's ClientApp process is
    res = subprocess.run([sys.executable, "-c", REFUSAL_WITHOUT_TORCH, json.dumps({**TINY, "dp": False}),
                          json.dumps(SITE_FILE)], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    # Assert: refused, naming the key, and torch never loaded
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["error"].startswith("PolicyError: dp=false: the run config asks this site to train without"), out
    assert out["torch"] is False
    # a site that takes part loads the model stack, and the import leaves the garbage collector on
    assert out["torch_after"] is True and out["gc"] is True


def test_a_run_asking_for_more_privacy_is_honoured_and_a_bare_supernode_gets_the_secure_defaults():
    # Execute
    stricter = apply_node_config(from_run_config({**TINY, "target-epsilon": 3.0}), SITE_FILE, deployed=True)
    # Assert: the smaller budget stands; a SuperNode without a policy gets DP at epsilon 8, never the run's
    assert stricter.privacy.enabled and stricter.privacy.target_epsilon == 3.0
    assert SitePolicy.from_node_config({"site-id": 1}) == SitePolicy(dp=True, target_epsilon=8.0, target_delta=1e-5)
    with pytest.raises(PolicyError, match="^target-epsilon=9"):
        apply_node_config(from_run_config({**TINY, "target-epsilon": 9.0}), {"site-id": 1}, deployed=True)


def test_only_the_sites_own_file_turns_dp_off_and_its_reply_and_ledger_say_so(tmp_path):
    # Prepare: the coordinator asks for DP; the site's own file says dp = false
    cfg = apply_node_config(from_run_config(TINY), {**SITE_FILE, "dp": "false"}, deployed=True)
    vault = SiteVault(tmp_path / "site-0", 0)
    # Execute
    reply = site_round(cfg, site=0, num_sites=2, server_round=1, global_state=initial_adapter_state(cfg),
                       vault=vault, deployed=True)
    # Assert: no DP, and the signed ledger entry and the reply both say it
    assert not cfg.privacy.enabled and reply.status == "trained" and reply.metrics["dp"] == 0.0
    assert "WITHOUT differential privacy" in reply.reason
    entries = verify_file(tmp_path / "site-0" / "ledger.jsonl", site=0, trusted_pem=vault.public_key()).entries
    assert [e["kind"] for e in entries] == ["open", "no-dp"]
    assert entries[1]["adjacency"].startswith("none: no differential privacy")
    assert json.loads(reply.ledger.decode().splitlines()[-1])["kind"] == "no-dp"
    with pytest.raises(Exception, match="must be true or false"):
        SitePolicy.from_node_config({"dp": "maybe"})
    # a site without DP still refuses the simulation-only attack and fault injection
    with pytest.raises(PolicyError, match="^attack='sign-flip'.*refused on a deployed site"):
        apply_node_config(from_run_config({**TINY, "attack": "sign-flip"}), {**SITE_FILE, "dp": "false"}, deployed=True)
