"""Compressed deltas (delta-format): codec bounds against hand-computed values, malformed wire
dicts rejected naming the key, error feedback exact across rounds and redone rounds, and a signed
int8 release that the server's ledger check accepts only as sent."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedpeft import compression
from fedpeft.federation import ReplyError, status_record, to_arrays, validate_train_reply
from fedpeft.runconfig import ConfigError, from_run_config


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": 1e-3 * torch.randn(8, 32, generator=g), "a.lora_B.weight": 1e-4 * torch.randn(32, 8, generator=g),
            "head.bias": torch.randn(7, generator=g)}


def test_int8_is_per_row_round_to_nearest_hand_computed():
    # Prepare: row 0 has max 1.27 (scale 0.01); row 1 is all zero (scale 0)
    t = torch.tensor([[1.27, -0.5, 0.004, 0.006], [0.0, 0.0, 0.0, 0.0]])
    # Execute
    wire = compression.encode({"w": t}, "int8")
    back = compression.decode(wire, "int8")["w"]
    # Assert: q = round(x / 0.01); 0.004 -> 0, 0.006 -> 1; the zero row decodes to zeros
    assert wire["w"].dtype == torch.int8 and wire["w"][0].tolist() == [127, -50, 0, 1]
    torch.testing.assert_close(wire["w::scale"], torch.tensor([0.01, 0.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(back, torch.tensor([[1.27, -0.5, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]]), rtol=1e-6,
                               atol=1e-8)


@pytest.mark.parametrize("fmt,ratio", [("float32", 1.0), ("float16", 0.5), ("int8", None)])
def test_each_format_stays_inside_its_error_bound_and_size(fmt, ratio):
    # Prepare
    delta = _delta()
    # Execute
    wire = compression.encode(delta, fmt)
    back = compression.decode(wire, fmt)
    # Assert: float16 relative error <= 2^-11 (round to nearest), absolute 2^-25 below its smallest
    # normal (6.1e-5: LoRA deltas reach it); int8 |error| <= scale / 2 per channel (the shorter side)
    full = compression.wire_bytes(compression.encode(delta, "float32"))
    for k, v in delta.items():
        err = (back[k] - v).abs()
        if fmt == "float32":
            assert torch.equal(back[k], v)
        elif fmt == "float16":
            assert bool((err <= torch.clamp(v.abs() * 2.0**-11, min=2.0**-25)).all())
        else:
            m = v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(1, -1)
            e = err.reshape(m.shape)
            if m.shape[0] > m.shape[1]:  # B (32 x 8): one scale per column
                m, e = m.T, e.T
            bound = m.abs().amax(dim=1, keepdim=True) / 127 / 2
            assert bool((e <= bound * (1 + 1e-6)).all())
    got = compression.wire_bytes(wire) / full
    if ratio is not None:
        assert got == ratio
    else:  # one byte per value, plus one float32 scale per channel: A 8 rows, B 8 columns, the bias 1
        assert compression.wire_bytes(wire) == sum(v.numel() for v in delta.values()) + 4 * (8 + 8 + 1)


@pytest.mark.parametrize("edit,match", [
    (lambda w: {k: v for k, v in w.items() if not k.endswith("::scale")}, "no a.lora_A.weight::scale"),
    (lambda w: {**w, "a.lora_A.weight": w["a.lora_A.weight"].to(torch.int16)}, "dtypes torch.int16"),
    (lambda w: {**w, "a.lora_B.weight::scale": torch.ones(32)}, r"shape \(32,\), expected \(8,\)"),
    (lambda w: {**w, "a.lora_A.weight::scale": -torch.ones(8)}, "finite and >= 0"),
    (lambda w: {**w, "stray::scale": torch.ones(1)}, "a scale without its tensor"),
])
def test_a_malformed_int8_reply_is_rejected_naming_the_key(edit, match):
    # Prepare: a well-formed int8 reply, then one edit
    wire = edit(compression.encode(_delta(), "int8"))
    content = RecordDict({"arrays": to_arrays(wire), "metrics": MetricRecord({"num-examples": 5, "site": 0})})
    # Execute / Assert
    with pytest.raises(ReplyError, match=match):
        validate_train_reply(content, expected=_delta(), delta_format="int8")


def test_a_float32_reply_to_a_float16_run_is_rejected_and_a_good_one_decodes():
    # Prepare
    delta = _delta()
    bad = RecordDict({"arrays": to_arrays(delta), "metrics": MetricRecord({"num-examples": 5, "site": 0})})
    good = RecordDict({"arrays": to_arrays(compression.encode(delta, "float16")),
                       "metrics": MetricRecord({"num-examples": 5, "site": 0})})
    # Execute / Assert
    with pytest.raises(ReplyError, match="delta-format='float16'.*dtype torch.float32"):
        validate_train_reply(bad, expected=delta, delta_format="float16")
    reply = validate_train_reply(good, expected=delta, delta_format="float16")
    assert reply.delta is not None and all(reply.delta[k].dtype == torch.float32 for k in delta)


def test_error_feedback_sends_the_sum_of_deltas_and_a_redone_round_sends_the_same_bytes(tmp_path):
    # Prepare: the same delta for 4 rounds
    delta = _delta()
    sent = {k: torch.zeros_like(v) for k, v in delta.items()}
    # Execute
    wires = []
    for rnd in range(1, 5):
        wire = compression.site_encode(delta, fmt="int8", feedback=True, folder=tmp_path, server_round=rnd)
        wires.append(wire)
        for k, v in compression.decode(wire, "int8").items():
            sent[k] += v
    redo = compression.site_encode(delta, fmt="int8", feedback=True, folder=tmp_path, server_round=4)
    # Assert: what was sent over 4 rounds is 4 x the delta minus the last residual (nothing lost), and
    # a redone round 4 (a resumed run) reads round 3's residual: bitwise the same wire
    from safetensors.torch import load_file

    residual = load_file(str(tmp_path / "residual-r000004.safetensors"))
    for k, v in delta.items():
        torch.testing.assert_close(sent[k] + residual[k], 4 * v, rtol=0, atol=1e-6 * float(v.abs().max()))
    assert all(torch.equal(redo[k], wires[-1][k]) for k in redo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residual-r000003.safetensors", "residual-r000004.safetensors"]


def test_the_ledger_signs_the_int8_bytes_sent_and_the_server_checks_those(tmp_path):
    from fedpeft.factory import initial_adapter_state
    from fedpeft.privacy.ledger import ServerCopies
    from fedpeft.privacy.vault import SiteVault
    from fedpeft.site import site_round

    # Prepare: a tiny DP site sending int8 deltas
    cfg = from_run_config({"model": "tiny", "lora-layers": "", "notes-per-site": 40, "test-per-site": 10,
                           "batch-size": 16, "dp-noise": "seeded", "delta-format": "int8"})
    glob = initial_adapter_state(cfg)
    vault = SiteVault(tmp_path / "site-0", 0)
    # Execute
    reply = site_round(cfg, site=0, num_sites=2, server_round=1, global_state=glob, vault=vault)
    assert reply.delta is not None and all(v.dtype in (torch.int8, torch.float32) for v in reply.delta.values())
    assert any(v.dtype == torch.int8 for v in reply.delta.values())

    def content(wire: dict[str, torch.Tensor]) -> RecordDict:
        return RecordDict({"arrays": to_arrays(wire), "metrics": MetricRecord(reply.metrics),
                           "status": status_record(reply)})

    key = next(k for k, v in reply.delta.items() if v.dtype == torch.int8)
    tampered = {**reply.delta, key: reply.delta[key].clone()}
    tampered[key].view(-1)[0] += 1
    # Assert: one changed int8 value breaks the signed hash; the reply as sent is accepted and decoded
    with pytest.raises(ReplyError, match="does not match the signed delta_sha256"):
        validate_train_reply(content(tampered), expected=glob, ledgers=ServerCopies(tmp_path / "ledger-a"),
                             server_round=1, delta_format="int8")
    ok = validate_train_reply(content(reply.delta), expected=glob, ledgers=ServerCopies(tmp_path / "ledger-b"),
                              server_round=1, delta_format="int8")
    assert ok.delta is not None and set(ok.delta) == set(glob)
    assert all(v.dtype == torch.float32 for v in ok.delta.values())
    assert isinstance(status_record(reply), ConfigRecord)


def test_an_unknown_format_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="delta-format='fp4'"):
        from_run_config({"delta-format": "fp4"})
