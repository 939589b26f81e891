"""The audit of a secure run, with no plaintext delta anywhere: every round's masked vectors are the
ones the sites signed, the adverts verify against the sites' keys, and the masked sum, unmasked
with the recorded reconstruction, equals the checkpoint's update within the ring's step."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedpeft.methods import answer_head
from fedpeft.privacy.ledger import LedgerError, delta_hash, verify_file
from fedpeft.ranks import A_SUFFIX
from fedpeft.secagg import ddp, span
from fedpeft.secagg import protocol as sa
from fedpeft.secagg.layout import Layout, LayoutError
from fedpeft.secagg.site import MASKED, VECTOR_ENTRY, vector_fields

CHECKPOINT = "adapter_model.safetensors"


def audit_secure_rounds(run: Path, *, signed: Mapping[tuple[int, int], set[str]], roster: Mapping[int, str]
                        ) -> tuple[list[str], list[str]]:
    """(failures, notes) for every ``secagg/round-*`` folder of ``run``. ``signed``: (site, round)
    -> the delta hashes its ledger signed; ``roster``: site -> the public key the audit trusts."""
    failures: list[str] = []
    notes: list[str] = []
    shares, vectors = _ledger_facts(run, roster)
    releases: list[float] = []
    plan: dict | None = None
    for folder in sorted((run / "secagg").glob("round-*")) if (run / "secagg").is_dir() else []:
        rnd = int(folder.name.split("-")[1])
        try:
            info = json.loads((folder / "round.json").read_text())
        except (OSError, ValueError) as e:
            failures.append(f"secure round {rnd}: round.json unreadable ({e})")
            continue
        found = _one_round(run, folder, rnd, info, signed, roster, vectors)
        if info.get("ddp"):
            plan = info["ddp"]
            found += _ddp_round(rnd, info, shares, releases)
        failures += found
        if not found:
            notes.append(f"secure round {rnd}: {len(info['survivors'])} masked vectors of {len(info['participants'])} "
                         f"participants (threshold {info['threshold']}) verified and unmasked to the checkpoint")
    head_stats = run / "checkpoints" / "round-000" / answer_head.STATISTICS_FILE
    if head_stats.exists() and not failures:
        notes.append(f"answer head: its updates were compared in plain peft's coordinates (A = V M), with M built "
                     f"from the public statistics kept with every checkpoint ({answer_head.STATISTICS_FILE}, sha256 "
                     f"{hashlib.sha256(head_stats.read_bytes()).hexdigest()[:16]}…, the same in every round). They "
                     "are the frozen model's final state over the public calibration prompts: recompute them from "
                     "the base model to check this file")
    if plan is not None and releases:
        eps = ddp.epsilon(releases=releases, clip=plan["clip"], scale=plan["scale"], dim=plan["dim"],
                          delta=plan["delta"])
        claimed = _claimed_client_epsilon(run)
        if claimed is None or abs(claimed - eps) > 0.01 * eps:
            failures.append(f"distributed DP: the sites' signed shares give client-level epsilon {eps:.4f} over "
                            f"{len(releases)} releases; the run claims {claimed}")
        else:
            notes.append(f"distributed DP (Skellam, one whole site): {len(releases)} releases, noise variance in "
                         f"the sum >= {min(releases):.4g} from the sites' signed shares; client-level epsilon "
                         f"{eps:.4f} at delta {plan['delta']:g} recomputed (claimed {claimed:.4f})")
    return failures, notes


def _ledger_facts(run: Path, roster: Mapping[int, str]) -> tuple[dict[tuple[int, int], dict],
                                                                 dict[tuple[int, int], list[dict]]]:
    """From each site's ledger, verified against the roster: (site, round) -> the distributed-DP
    share its release entry declares, and -> its vector entries (``secagg-vector``)."""
    shares: dict[tuple[int, int], dict] = {}
    vectors: dict[tuple[int, int], list[dict]] = {}
    for site, pem in roster.items():
        try:
            entries = verify_file(run / "ledger" / f"site-{site}.jsonl", site=site, trusted_pem=pem).entries
        except (LedgerError, OSError):
            continue  # reported by the ledger checks
        for e in entries:
            if isinstance(e.get("ddp"), dict):
                shares[(site, int(e["round"]))] = e["ddp"]
            if e.get("kind") == VECTOR_ENTRY:
                vectors.setdefault((site, int(e["round"])), []).append(e)
    return shares, vectors


def _ddp_round(rnd: int, info: dict, shares: Mapping[tuple[int, int], dict], releases: list[float]) -> list[str]:
    """The noise in this round's sum, from the survivors' signed shares: (t - 1) x the smallest."""
    t = int(info["threshold"])
    got = [shares.get((s, rnd)) for s in info["survivors"]]
    if any(g is None for g in got):
        missing = [s for s, g in zip(info["survivors"], got) if g is None]
        return [f"secure round {rnd}: sites {missing} signed no distributed-DP share"]
    local = min(float(g["local_variance"]) for g in got if g is not None)
    total = (t - 1) * local
    if total < 0.999 * float(info["ddp"]["total_variance"]):
        return [f"secure round {rnd}: the sites' signed shares carry noise variance {total:.4g} in the sum, below "
                f"the planned {info['ddp']['total_variance']:.4g}"]
    releases.append(total)
    return []


def _claimed_client_epsilon(run: Path) -> float | None:
    try:
        rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return None
    vals = [r.get("client_epsilon") for r in rounds if r.get("client_epsilon") is not None]
    return float(vals[-1]) if vals else None


def _one_round(run: Path, folder: Path, rnd: int, info: dict, signed: Mapping[tuple[int, int], set[str]],
               roster: Mapping[int, str], vectors: Mapping[tuple[int, int], list[dict]]) -> list[str]:
    out = []
    try:
        adverts = sa.verify_adverts([sa.KeyAdvert.from_json(a) for a in info["adverts"].values()],
                                    roster=roster, server_round=rnd)
    except sa.SecAggError as e:
        return [f"secure round {rnd}: {e}"]
    ranged = "range_senders" in info  # a range stage ran (no distributed DP): the ledgers sign range vectors
    bits, range_sha = span.FALLBACK, dict[int, str]()
    if ranged:
        try:
            bits, range_sha = _check_ranges(folder, rnd, info, signed)
        except ValueError as e:
            return [f"secure round {rnd}: {e}"]
    masked: dict[int, np.ndarray] = {}
    files = {int(p.stem.split("-")[1]) for p in folder.glob("site-*.safetensors")}
    for s in sorted(set(info["survivors"]) | files):
        path = folder / f"site-{s}.safetensors"
        if s not in files:
            out.append(f"secure round {rnd}: site {s}'s masked vector is missing ({path.name})")
            continue
        if s not in info["survivors"]:
            out.append(f"secure round {rnd}: {path.name} is not listed among the round's survivors")
            continue
        t = load_file(str(path))["masked"]
        if ranged:
            raw = t.numpy().astype("<i4" if bits.ring_bits == span.NARROW else "<i8").tobytes()
            digest = hashlib.sha256(raw).hexdigest()
            want = vector_fields(rnd, bits, range_sha.get(s, ""), digest)
            if not any({k: e.get(k) for k in want} == want for e in vectors.get((s, rnd), [])):
                out.append(f"secure round {rnd}: site {s}'s masked vector {digest[:12]}… matches no signed ledger entry "
                           "(secagg-vector)")
            masked[s] = span.widen(raw, t.numel(), bits)
            continue
        digest = delta_hash({MASKED: t})
        if digest not in signed.get((s, rnd), set()):
            out.append(f"secure round {rnd}: site {s}'s masked vector {digest[:12]}… matches no signed ledger entry")
        masked[s] = t.numpy().view(np.uint64)
    if out:
        return out
    try:
        before = load_file(str(run / "checkpoints" / f"round-{rnd - 1:03d}" / CHECKPOINT))
        after = load_file(str(run / "checkpoints" / f"round-{rnd:03d}" / CHECKPOINT))
    except OSError as e:
        return [f"secure round {rnd}: checkpoint missing ({e})"]
    saved = before, after
    kept = [p.read_bytes() if p.exists() else None
            for p in (run / "checkpoints" / f"round-{r:03d}" / answer_head.STATISTICS_FILE for r in (rnd - 1, rnd))]
    if kept[0] != kept[1]:  # M must be one public map for the whole run
        return [f"secure round {rnd}: the answer head's statistics ({answer_head.STATISTICS_FILE}) differ between "
                f"the checkpoints of rounds {rnd - 1} and {rnd}"]
    try:
        whiten = answer_head.read_statistics(run / "checkpoints" / f"round-{rnd:03d}")
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
        return [f"secure round {rnd}: the answer head's statistics are unreadable ({e})"]
    if whiten is not None:  # the answer head's sites masked V; the checkpoints hold plain peft's A = V M
        before, after = answer_head.exchanged(before, whiten), answer_head.exchanged(after, whiten)
    frozen = info.get("merge") == "frozen_a"  # the sum is the new adapter (A shared and unchanged)
    layout = Layout.of({k: v for k, v in before.items() if not (frozen and k.endswith(A_SUFFIX))})
    try:
        total = sa.unmask_with(masked, adverts, {int(k): bytes.fromhex(v) for k, v in info["seeds"].items()},
                               {int(k): bytes.fromhex(v) for k, v in info["mask_keys"].items()}, server_round=rnd)
        if info.get("ddp"):  # integers: the rounded, noised updates over the scale, then over the sites
            vals = total.view(np.int64).astype(np.float64)
            vals[:-1] /= float(info["ddp"]["scale"])
        else:
            vals = span.decode(total, bits)
        mean, weight = layout.unpack_mean(vals)
    except (sa.SecAggError, LayoutError, KeyError, ValueError) as e:
        return [f"secure round {rnd}: the masked sum does not unmask ({e})"]
    for k, m in mean.items():
        step = after[k].double() - (0.0 if frozen else before[k].double())
        # float32 checkpoints: one rounding of each; the ring: half a step per site, over the total weight
        tol = 2 * torch.finfo(torch.float32).eps * after[k].double().abs().max().item() + \
            2 * span.error_bound(bits, len(masked), weight) + m.abs().max().item() * len(masked) * 2.0**-29
        err = (m - step).abs().max().item()
        if whiten is not None and f"{answer_head.HEAD}.lora_A." in k:  # compared as saved: A = V M
            err, tol = answer_head.saved_step(m, (saved[0][k], before[k]), (saved[1][k], after[k]), whiten, tol)
        if not err <= tol:
            out.append(f"secure round {rnd}: {k}: the unmasked mean differs from the checkpoint's update by "
                       f"{err:.3g} (tolerance {tol:.3g})")
            break
    return out


def _check_ranges(folder: Path, rnd: int, info: dict, signed: Mapping[tuple[int, int], set[str]]
                  ) -> tuple[span.Bits, dict[int, str]]:
    """A round with a range stage: each range vector is one its site's ledger signed, and the ring is
    the one the sum of every participant's range vector gives (their masks cancel there only; a
    missing one means the 64-bit fallback). Returns the ring and each range vector's hash; raises
    ``ValueError`` naming what failed."""
    ranges = {}
    for s in info["range_senders"]:
        try:
            t = load_file(str(folder / f"range-{s}.safetensors"))[MASKED]
        except OSError:
            raise ValueError(f"site {s}'s range vector is missing (range-{s}.safetensors)") from None
        digest = delta_hash({MASKED: t})
        if digest not in signed.get((s, rnd), set()):
            raise ValueError(f"site {s}'s range vector {digest[:12]}… matches no signed ledger entry")
        ranges[s] = (t.numpy().view(np.uint64), digest)
    full = bool(ranges) and set(ranges) == set(info["participants"])
    bits = span.plan_bits(span.range_total({s: v for s, (v, _) in ranges.items()})) if full else span.FALLBACK
    if info.get("ring") != bits.as_dict():
        raise ValueError(f"the round's ring {info.get('ring')} is not the one its range sum gives {bits.as_dict()}")
    return bits, {s: d for s, (_, d) in ranges.items()}
