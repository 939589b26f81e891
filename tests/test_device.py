"""Device and precision choice, DP randomness on the parameters' device and from secret seeds,
and the per-worker state a virtual site keeps across rounds."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from fedpeft import adapters, factory, models, prefix, site, training
from fedpeft.policy import PolicyError, check_noise_source
from fedpeft.runconfig import from_run_config
from tests.conftest import make_tiny_lora

TINY = {"model": "tiny", "lora-layers": "", "lr": 0.01, "adapter-lr-scale": 1.0, "notes-per-site": 40,
        "test-per-site": 10, "num-server-rounds": 2, "batch-size": 16}


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    # Prepare: a CPU with / without AVX512-BF16 or AMX
    monkeypatch.setattr(models, "cpu_has_native_bfloat16", lambda: native)
    # Execute / Assert
    assert models.resolve_precision("auto", torch.device("cpu")) == expected
    assert models.resolve_precision("float32", torch.device("cpu")) == "float32"
    assert models.resolve_precision("bfloat16", torch.device("cpu")) == "bfloat16"  # forced: honoured


@pytest.mark.parametrize("bf16, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_precision_follows_the_gpu(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert models.resolve_precision("auto", torch.device("cuda")) == expected


def test_forcing_bfloat16_on_a_cpu_without_it_warns_once(monkeypatch, caplog):
    # Prepare
    monkeypatch.setattr(models, "cpu_has_native_bfloat16", lambda: False)
    models._warn_once.cache_clear()
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedpeft.models"):
        for _ in range(3):
            models.resolve_precision("bfloat16", torch.device("cpu"))
    # Assert
    slow = [r for r in caplog.records if "without native bfloat16" in r.getMessage()]
    assert len(slow) == 1 and "slower" in slow[0].getMessage()


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    # Prepare: a fake /proc/cpuinfo with and without the flag
    import fedpeft.models as m

    for flags, expected in (("fpu avx2 fma", False), ("fpu avx2 avx512f avx512_bf16", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(m, "Path", lambda _p, _t=tmp_path / "cpuinfo": _t)
        m.cpu_has_native_bfloat16.cache_clear()
        # Execute / Assert
        assert m.cpu_has_native_bfloat16() is expected
    m.cpu_has_native_bfloat16.cache_clear()


def test_physical_batch_is_the_whole_batch_on_a_gpu():
    assert models.physical_batch_size(0, torch.device("cuda")) is None
    assert models.physical_batch_size(0, torch.device("cpu")) == 128
    assert models.physical_batch_size(32, torch.device("cuda")) == 32


def test_noise_generator_lives_on_the_parameters_device(tiny_dataset, fast_train, dp_on, device, monkeypatch):
    """Opacus draws noise with torch.normal(device=param.device, generator=g): g must be there too."""
    from opacus import PrivacyEngine

    # Prepare: record the generators Opacus is handed
    seen = {}
    orig = PrivacyEngine.make_private

    def spy(self, **kw):
        seen["noise"] = kw["noise_generator"]
        seen["sampling"] = kw["data_loader"].generator
        return orig(self, **kw)

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    state = training.plan_privacy(num_examples=len(tiny_dataset), train=fast_train, privacy=dp_on, num_rounds=1)
    # Execute
    t0 = time.perf_counter()
    res = training.train_local(make_tiny_lora(), tiny_dataset, train=fast_train, privacy=dp_on,
                               privacy_state=state, device=device, seed=0)
    took = time.perf_counter() - t0
    # Assert: noise on the device, Poisson masks on the CPU (Opacus draws them there), a step was taken;
    # the passes' own time is part of the call's
    assert seen["noise"].device.type == device.type
    assert seen["sampling"].device.type == "cpu"
    assert res.steps == state.planned_steps and res.epsilon > 0
    assert 0 < res.pass_seconds < took


def _train_once(dataset, train, privacy, *, noise_seed):
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same start every time
    model = make_tiny_lora()
    state = training.plan_privacy(num_examples=len(dataset), train=train, privacy=privacy, num_rounds=1)
    training.train_local(model, dataset, train=train, privacy=privacy, privacy_state=state,
                         device=torch.device("cpu"), seed=0, noise_seed=noise_seed)
    return adapters.get_adapter_state(model)


def test_dp_noise_is_secret_by_default_and_seeded_only_on_request(tiny_dataset, fast_train, dp_on):
    # Execute: the same call (same run seed) twice without and twice with a noise seed
    secret = [_train_once(tiny_dataset, fast_train, dp_on, noise_seed=None) for _ in range(2)]
    seeded = [_train_once(tiny_dataset, fast_train, dp_on, noise_seed=123) for _ in range(2)]
    # Assert: the run seed alone does not determine the noise; a noise seed reproduces it bitwise
    assert any(not torch.equal(secret[0][k], secret[1][k]) for k in secret[0])
    assert all(torch.equal(seeded[0][k], seeded[1][k]) for k in seeded[0])


def test_sites_draw_secret_noise_unless_the_run_asks_for_seeded():
    # Prepare
    cfgs = {noise: from_run_config({**TINY, "dp-noise": noise}) for noise in ("secret", "seeded")}
    glob = factory.initial_adapter_state(cfgs["secret"])
    # Execute: the same site, round and run config twice
    deltas = {noise: [site.site_train(cfg, site=0, num_sites=2, server_round=1, global_state=glob,
                                      privacy_json=None)[0] for _ in range(2)] for noise, cfg in cfgs.items()}
    # Assert
    a, b = deltas["secret"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    a, b = deltas["seeded"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_deployed_site_refuses_seeded_noise():
    seeded = from_run_config({**TINY, "dp-noise": "seeded"})
    with pytest.raises(PolicyError, match="dp-noise=.seeded.: refused on a deployed site"):
        check_noise_source(seeded, deployed=True)
    check_noise_source(seeded, deployed=False)  # a simulation may
    check_noise_source(from_run_config(TINY), deployed=True)  # secret noise is always fine


def test_client_app_refuses_seeded_noise_without_a_simulation_partition():
    from types import SimpleNamespace

    from flwr.app import Context, RecordDict

    from clients import client_app
    from fedpeft.federation import CONFIG, config_record
    from fedpeft.runconfig import to_run_config

    # Prepare: a run that asks for seeded noise, seen by a real SuperNode (no partition-id) and a virtual one
    flat = {**to_run_config(from_run_config({**TINY, "dp-noise": "seeded"})), "server-round": 1}
    msg = SimpleNamespace(content={CONFIG: config_record(flat)})  # _setup reads only the config record
    deployed = Context(run_id=1, node_id=1, node_config={"site-id": 0}, state=RecordDict(), run_config={})
    virtual = Context(run_id=1, node_id=2, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    # Execute / Assert
    with pytest.raises(PolicyError, match="refused on a deployed site"):
        client_app._setup(msg, deployed)
    no_dp = SimpleNamespace(content={CONFIG: config_record({**to_run_config(from_run_config({**TINY, "dp": False})),
                                                            "server-round": 1})})
    with pytest.raises(PolicyError, match="^dp=false: the run config asks this site to train without"):
        client_app._setup(no_dp, deployed)
    assert not client_app._setup(no_dp, virtual)[0].privacy.enabled  # a simulation may
    from fedpeft.data.sites import simulated_site

    cfg = from_run_config(flat)
    assert client_app._setup(msg, virtual)[1:3] == (simulated_site(0, 2, cfg.data, seed=cfg.train.seed), 2)


def test_worker_reuses_its_model_and_data_without_leaking_between_sites():
    # Prepare: seeded noise so two trainings of the same site and round must agree bitwise
    cfg = from_run_config({**TINY, "dp-noise": "seeded"})
    glob = factory.initial_adapter_state(cfg)
    site._SITES.clear()
    factory._worker_model.cache_clear()  # earlier tests' configs (other shapes) would be counted too
    first, _, _ = site.site_train(cfg, site=0, num_sites=3, server_round=1, global_state=glob, privacy_json=None)
    # Execute: another site trains on the same worker model, then site 0 again
    site.site_train(cfg, site=1, num_sites=3, server_round=1, global_state=glob, privacy_json=None)
    model_before = factory._worker_model.cache_info().currsize
    again, _, _ = site.site_train(cfg, site=0, num_sites=3, server_round=1, global_state=glob, privacy_json=None)
    # Assert: same delta bitwise; one model and each site's data kept in this worker
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert model_before == factory._worker_model.cache_info().currsize == 1
    assert len(site._SITES) == 2


def test_bytes_lru_evicts_the_least_recent_by_bytes():
    lru = prefix.BytesLRU(100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3, 40)  # 120 > 100: b goes
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    lru.put("huge", 4, 101)  # larger than the budget: never kept
    assert lru.get("huge") is None and len(lru) == 2


def test_memory_budget_is_shared_among_workers(monkeypatch):
    monkeypatch.delenv(prefix.CACHE_BYTES_ENV, raising=False)
    monkeypatch.setenv(prefix.WORKERS_ENV, "1")
    one = prefix.memory_budget()
    monkeypatch.setenv(prefix.WORKERS_ENV, "4")
    assert prefix.memory_budget() == pytest.approx(one / 4, rel=1e-6)
    monkeypatch.setenv(prefix.CACHE_BYTES_ENV, "12345")
    assert prefix.memory_budget() == 12345


def test_simulation_shares_a_gpu_among_the_concurrent_sites(monkeypatch):
    from fedpeft.cli import _backend

    # Prepare: an 8-core machine, 2 CPUs per virtual site
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cfg = from_run_config({**TINY, "client-cpus": 2})
    # Execute
    with_gpu, workers = _backend(cfg, cuda=True)
    without, _ = _backend(cfg, cuda=False)
    # Assert: 4 sites at once, each a quarter of the GPU; none without one
    assert workers == 4
    assert with_gpu["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}
    assert without["client_resources"]["num_gpus"] == 0.0


def test_a_deployed_site_refuses_seeded_distributed_dp_noise_even_with_its_own_dp_off():
    # Prepare: record-level DP off (a site's own policy may say so), client-level DP by Skellam shares, seeded
    cfg = from_run_config({**TINY, "dp": False, "client-dp": True, "secure-aggregation": True, "dp-noise": "seeded"})
    # Execute / Assert: the coordinator knows the run seed, so it could regenerate the site's share
    with pytest.raises(PolicyError, match="dp-noise=.seeded.: refused on a deployed site"):
        check_noise_source(cfg, deployed=True)
    check_noise_source(cfg, deployed=False)
