"""What leaves a site: exactly the adapter delta; bad site data fails naming the site."""

from __future__ import annotations

import pytest
import torch

from fedpeft import adapters
from fedpeft.config import from_run_config
from fedpeft.privacy.accountant import PrivacyState
from fedpeft.site import SiteError, build_model, initial_adapter_state, site_evaluate, site_train

TINY = {"model": "tiny", "lora-layers": "", "lr": 0.01, "adapter-lr-scale": 1.0, "notes-per-site": 40, "test-per-site": 10, "num-server-rounds": 2, "batch-size": 16}


@pytest.mark.parametrize("layers", ["", "1"])  # "1": layer 0 is a frozen prefix, served from the cache
def test_only_adapter_delta_leaves_the_site(layers, device):
    # Prepare
    cfg = from_run_config({**TINY, "lora-layers": layers})
    glob = initial_adapter_state(cfg)
    model = build_model(cfg, dp=True)
    trainable = {n.replace(".default", "") for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Execute
    delta, metrics, pjson = site_train(cfg, site=1, num_sites=3, server_round=1, global_state=glob,
                                       privacy_json=None)
    # Assert: keys are exactly the trainable adapter tensors, bytes = params x 4 (fp32)
    assert set(delta) == set(glob) == {k.replace(".modules_to_save", "") for k in trainable}
    assert adapters.state_bytes(delta) == n_trainable * 4 == metrics["bytes-up"]
    assert all(not torch.equal(d, torch.zeros_like(d)) for d in delta.values())
    state = PrivacyState.from_json(pjson)
    assert metrics["epsilon"] == pytest.approx(state.epsilon())
    assert 0 < metrics["epsilon"] < cfg.privacy.target_epsilon


def test_privacy_state_carried_between_rounds_accumulates():
    cfg = from_run_config(TINY)
    glob = initial_adapter_state(cfg)
    _, m1, p1 = site_train(cfg, site=0, num_sites=2, server_round=1, global_state=glob, privacy_json=None)
    _, m2, p2 = site_train(cfg, site=0, num_sites=2, server_round=2, global_state=glob, privacy_json=p1)
    assert m1["epsilon"] < m2["epsilon"] <= cfg.privacy.target_epsilon
    assert PrivacyState.from_json(p2).noise_multiplier == PrivacyState.from_json(p1).noise_multiplier


def test_site_with_malformed_data_fails_naming_the_site(tmp_path):
    (tmp_path / "site0.csv").write_text("text,label\nchest pain,cardiology\n")
    (tmp_path / "site1.csv").write_text("text,label\nchest pain,oncology\n")
    cfg = from_run_config({**TINY, "data": str(tmp_path / "site{site}.csv"), "labels": "cardiology,neurology"})
    glob = initial_adapter_state(cfg)
    with pytest.raises(SiteError, match=r"site 1: cannot load data .*site1.csv.*unknown label 'oncology'"):
        site_train(cfg, site=1, num_sites=2, server_round=1, global_state=glob, privacy_json=None)
    with pytest.raises(SiteError, match=r"site 2: cannot load data .*site2.csv.*file not found"):
        site_evaluate(cfg, site=2, num_sites=3, global_state=glob)
