"""Config dataclasses: bad values named with their value; flat Flower config round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedpeft.cli import simulation_config
from fedpeft.config import ConfigError, RunConfig
from fedpeft.runconfig import from_run_config, to_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("target-epsilon", 0, "target-epsilon=0.0: must be > 0"),
        ("target-delta", 1.5, "target-delta=1.5"),
        ("max-grad-norm", -1, "max-grad-norm=-1.0"),
        ("lora-rank", 0, "lora-rank=0"),
        ("adapter", "prefix", "adapter='prefix'"),
        ("fraction-train", 0.0, "fraction-train=0.0"),
        ("lora-layers", "a,b", "lora-layers='a,b'"),
        ("lr", "fast", "lr='fast': must be a number"),
        ("dp", "maybe", "dp='maybe': must be a boolean"),
        ("head-init", "lucky", "head-init='lucky'"),
        ("head-template", "a note", "head-template='a note': must contain {label}"),
        ("precision", "float16", "precision='float16': must be one of auto, float32, bfloat16"),
        ("model-dropout", 1.0, "model-dropout=1.0: must be in"),
        ("dp-noise", "fixed", "dp-noise='fixed': must be one of secret, seeded"),
        ("max-physical-batch-size", -1, "max-physical-batch-size=-1: must be >= 0"),
        ("fault-crash", 1.5, "fault-crash=1.5: must be in"),
        ("fault-hang", 0.2, "fault-hang-seconds=60.0: a hang must outlast round-timeout (round-timeout=0.0"),
        ("round-timeout", -1, "round-timeout=-1.0: must be >= 0"),
        ("no-such-key", 1, "no-such-key=1: unknown config key"),
    ],
)
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_run_config({key: value})


def test_flat_round_trip():
    cfg = from_run_config({"lora-rank": 4, "dp": False, "num-server-rounds": 5, "lora-layers": "4,5"})
    assert cfg.adapter.rank == 4 and not cfg.privacy.enabled and cfg.federation.num_rounds == 5
    assert cfg.adapter.layer_list == [4, 5]
    assert from_run_config(to_run_config(cfg)) == cfg


def test_pyproject_flower_config_lists_every_key_and_is_the_hospitals_preset():
    # `flwr run` only accepts overrides for keys the app declares; they must not drift from the dataclasses.
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(to_run_config(RunConfig()))
    # and they are the default job, `fedpeft simulate`'s hospitals preset (its file included)
    assert from_run_config(declared) == from_run_config(simulation_config("hospitals", None, None))


def test_cli_rejects_a_bad_override_before_starting_anything(capsys):
    from fedpeft.cli import main

    code = main(["simulate", "--preset", "smoke", "--run-config", "lora-rank=0"])
    assert code == 2
    assert "lora-rank=0: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("model=minilm", "--run-config 'model=minilm': model is not key=<TOML value> (strings need quotes: model='minilm')"),
    ("lora-rank=abc", "(strings need quotes: lora-rank='abc')"),
])
def test_cli_names_an_unquoted_value_in_one_line(capsys, override, message):
    from fedpeft.cli import main

    # Execute
    code = main(["simulate", "--preset", "smoke", "--run-config", f"num-sites=3 {override}"])
    # Assert: exit 2, one line on stderr naming the token and the quoting, no traceback
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedpeft: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_unknown_preset_and_help_list_the_presets_folder(capsys):
    from fedpeft.cli import main, preset_names

    assert main(["simulate", "--preset", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft: error: --preset='nosuch': no such preset") and "hetero-hospitals" in err
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert len(preset_names()) == 8 and all(name in out for name in preset_names())


def test_simulate_refuses_an_out_dir_holding_an_earlier_run(tmp_path, capsys):
    import fedpeft.cli as cli

    # Prepare: an earlier run's ledger (evidence)
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / "site-0.jsonl").write_text("{}\n")
    # Execute / Assert: refused, nothing deleted; --overwrite is explicit and says what goes
    assert cli.main(["simulate", "--preset", "smoke", "--out", str(tmp_path)]) == 2
    assert "holds an earlier run (ledger)" in capsys.readouterr().err
    assert (tmp_path / "ledger" / "site-0.jsonl").exists()
    cli.check_out_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "ledger").exists()


def test_repeated_run_config_flags_all_apply(monkeypatch, tmp_path):
    import fedpeft.cli as cli

    # Prepare: capture the config `simulate` would run instead of running it
    seen: list[dict] = []

    def fake_simulate(flat, overwrite=False, ray_address=None):
        seen.append(flat)
        return {"rounds": [{"global": {"accuracy": 0.5}}], "wall_s": 0.0}

    monkeypatch.setattr(cli, "simulate", fake_simulate)
    # Execute
    code = cli.main(["simulate", "--preset", "smoke", "--run-config", "precision='float32'",
                     "--run-config", "lora-rank=4 num-sites=3", "--out", str(tmp_path)])
    # Assert: every flag counts, not only the last one
    assert code == 0
    assert (seen[0]["precision"], seen[0]["lora-rank"], seen[0]["num-sites"]) == ("float32", 4, 3)


def test_presets_are_valid_configs():
    from fedpeft.cli import PRESET_DIR, simulation_config

    names = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    assert names == ["attacks", "clinical-gen", "devices", "hetero-hospitals", "hospitals", "hospitals-large", "smoke",
                     "tiny-gen"]
    for name in names:
        cfg = from_run_config(simulation_config(name, None, None))
        assert cfg.preset == name and cfg.federation.out_dir == f"runs/{name}"


def test_overrides_parse_like_flowers_run_config():
    from flwr.common.config import parse_config_args

    from fedpeft.runconfig import parse_overrides

    items = ["precision='float32' num-sites=3 lr=0.1 dp=false lora-layers=\"4,5\""]
    assert parse_overrides(items) == parse_config_args(items)
    with pytest.raises(ConfigError, match="run-config='num-sites': must be key=value"):
        parse_overrides(["num-sites"])
