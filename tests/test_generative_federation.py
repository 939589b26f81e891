"""End to end on the `tiny-gen` preset (a random 2-layer Llama) in Flower's Simulation Engine:
the causal-lm task through the same apps, ledgers, audit and export as classification."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from fedpeft import factory
from fedpeft.cli import main, simulate, simulation_config
from fedpeft.export import generate, load_causal_lm
from fedpeft.llm import load_causal_lm as base_lm
from fedpeft.runconfig import from_run_config
from tests.conftest import ONE_WORKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-gen")
    # DoRA (a non-LoRA method end to end) sending int8 deltas with error feedback
    flat = simulation_config("tiny-gen", ["dp-noise='seeded' adapter='dora' delta-format='int8' error-feedback=true "
                                         f"{ONE_WORKER}"],
                             str(out))
    return out, flat, simulate(flat)


def test_generative_federation_trains_with_dp_records_its_metrics_and_passes_the_audit(gen_run, capsys):
    out, flat, metrics = gen_run
    cfg = from_run_config(flat)
    rounds = metrics["rounds"]
    # Assert: every round, every site spent epsilon within budget; perplexity and answer accuracy recorded
    assert metrics["task"] == "causal-lm" and "answer accuracy" in metrics["metric_label"]
    assert [r["round"] for r in rounds] == list(range(cfg.federation.num_rounds + 1))
    for r in rounds:
        g = r["global"]
        assert 0 <= g["accuracy"] <= 1 and g["perplexity"] == pytest.approx(2.718281828459045 ** g["loss"], rel=1e-9)
    for r in rounds[1:]:
        assert sorted(r["sites"], key=int) == [str(s) for s in range(cfg.federation.num_sites)]
        for m in r["sites"].values():
            assert 0 < m["epsilon"] <= cfg.privacy.target_epsilon and 0 <= m["accuracy"] <= 1
    assert rounds[-1]["global"]["loss"] < rounds[0]["global"]["loss"]  # the random model learns something
    # int8: one byte per value plus one float32 scale per row, about a quarter of float32
    for m in rounds[-1]["sites"].values():
        assert 0.25 < m["bytes_up"] / metrics["adapter_bytes"] < 0.35
    assert all((out / "sites" / f"site-{s}" / f"residual-r{cfg.federation.num_rounds:06d}.safetensors").exists()
               for s in range(cfg.federation.num_sites))
    # the signed ledgers recompute to the same epsilon (record-level: one example)
    assert main(["audit", str(out), "--empirical", "--canaries", "200"]) == 0
    report = json.loads((out / "audit" / "report.json").read_text())
    assert report["ok"] and len(report["sites"]) == cfg.federation.num_sites
    for s, site in report["sites"].items():  # the recomputed claim equals what each site reported
        assert site["claimed_epsilon"] == pytest.approx(rounds[-1]["sites"][s]["epsilon"])
        assert report["empirical"]["sites"][s]["epsilon_lower_bound"] <= site["epsilon_rdp"]
    assert "seeded" in capsys.readouterr().out
    for name in ("accuracy.png", "perplexity.png", "epsilon.png", "split.png"):
        assert (out / "plots" / name).stat().st_size > 5_000
    card = (out / "adapter" / "README.md").read_text()
    assert "causal language modelling" in card and "fedpeft generate" in card


def test_exported_adapter_reloads_with_plain_peft_and_generates(gen_run):
    out, flat, _ = gen_run
    cfg = from_run_config(flat)
    # Prepare: the server's own model for the final adapter
    served = factory.Scorer(cfg)(adapter_file_state(out))
    ids = torch.tensor([[1, 20, 300, 4000, 50, 6]])
    # Execute: plain peft on the base fedpeft.json names, and the one-line loader
    plain = PeftModel.from_pretrained(base_lm(cfg.model), str(out / "adapter")).eval()
    with torch.no_grad():
        want = served(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(load_causal_lm(out / "adapter")(input_ids=ids).logits, want, rtol=0, atol=0)
    answers = generate(out / "adapter", ["Referral note: 70 year old man with chest pain.\nSpecialty?"],
                       max_new_tokens=3, precision="float32")
    assert len(answers) == 1 and isinstance(answers[0], str)


def adapter_file_state(out):
    """The exported adapter's tensors, as the server held them (peft's key names)."""
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))
