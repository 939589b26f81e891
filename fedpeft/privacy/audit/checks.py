"""``fedpeft audit DIR``: everything a privacy officer checks in a run folder, without trusting
the coordinator's numbers.

For each site's ledger copy (``DIR/ledger/site-<id>.jsonl``): signatures and hash chain against
the registered key (``site-<id>.pub``, or ``--keys``), epsilon recomputed from the ledger's own
(sigma, q, steps) with a second accountant (``dp_accounting``), overruns of the site's budget,
seeded noise on a deployed site; for the run: every merged delta of every checkpointed round
covered by a signed entry of its site. Each failure names the site and the entry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.privacy.audit.accounting import RDP_TOLERANCE, epsilon_pld, epsilon_rdp
from fedpeft.privacy.events import DpSgdEvent
from fedpeft.privacy.ledger import LedgerError, fingerprint, verify_file

SEEDED_STATEMENT = ("reproducible by anyone with the run seed — no protection against the coordinator "
                    "(simulation only)")


@dataclass
class SiteAudit:
    site: int
    releases: int = 0
    declines: int = 0
    steps: int = 0
    target_epsilon: float = float("nan")  # nan: unknown (no verified release says it)
    delta: float = float("nan")
    claimed_epsilon: float = float("nan")
    epsilon_rdp: float = float("nan")  # dp_accounting RDP, recomputed from the ledger
    epsilon_pld: float = float("nan")  # dp_accounting PLD (tighter; what a PRV claim is checked against)
    noise: list[str] = field(default_factory=list)
    accountant: str = ""
    adjacency: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per release: round, claimed, recomputed
    verified: bool = False
    history: list[DpSgdEvent] = field(default_factory=list)  # one event per release
    max_grad_norm: float = float("nan")
    fingerprint: str = ""  # SHA-256 of the public key the audit trusted for this site
    no_dp: int = 0  # releases the site's own policy made without DP
    deployed: bool | None = None  # from its entries; None: unknown
    first_time: float | None = None  # ledger times (the site's clock)
    last_time: float | None = None

    @property
    def epsilon_recomputed(self) -> float:
        """The audit's epsilon of the same kind as the claim: PLD for a PRV claim (both compute the
        exact privacy curve numerically), RDP for an RDP claim."""
        return self.epsilon_pld if self.recomputed_with == "PLD" else self.epsilon_rdp

    @property
    def recomputed_with(self) -> str:
        """dp_accounting's accountant that checks this site's claim."""
        return "PLD" if self.accountant == "prv" else "RDP"


@dataclass
class AuditResult:
    run_dir: str
    sites: dict[int, SiteAudit] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    tolerance: float = RDP_TOLERANCE
    empirical: dict[str, Any] = field(default_factory=dict)
    client_level: dict[str, Any] = field(default_factory=dict)  # server-side (one whole site) DP, if any
    trust_root: str = ""  # whose copies of the sites' public keys the signatures were checked against
    keys_supplied: bool = False  # True: the auditor's own (--keys); False: the coordinator's copies
    provenance: dict[str, Any] = field(default_factory=dict)  # times, versions, config, adapter hash
    secure_rounds: list[str] = field(default_factory=list)  # secure aggregation: each round verified

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        """PASS only against keys the auditor obtained from the sites; trusting the coordinator's
        copies can at best be a qualified pass (a coordinator that swapped a key could re-sign)."""
        if self.failures:
            return "FAIL"
        return "PASS" if self.keys_supplied else "QUALIFIED PASS"

    @property
    def run_kind(self) -> str:
        flags = {a.deployed for a in self.sites.values() if a.deployed is not None}
        if not flags:
            return "unknown"
        return "deployment" if flags == {True} else "simulation" if flags == {False} else "mixed"

    def to_json(self) -> dict[str, Any]:
        from fedpeft.privacy.audit.statement import privacy_statement

        d = asdict(self)
        d["sites"] = {str(k): v for k, v in d["sites"].items()}
        d["ok"] = self.ok
        d["verdict"] = self.verdict
        d["run_kind"] = self.run_kind
        d["statement"] = privacy_statement(self)
        return d


_SITE = re.compile(r"site-(\d+)\.jsonl$")
PLD_SLACK = 0.02  # absolute epsilon: Opacus' PRV reports within eps_error=0.01 above the curve, PLD ~0.01 below


def _audit_site(res: AuditResult, site: int, path: Path, trusted: str | None) -> None:
    sa = SiteAudit(site=site)
    res.sites[site] = sa
    if trusted is not None:
        try:
            sa.fingerprint = fingerprint(trusted)
        except (LedgerError, ValueError) as e:
            res.failures.append(f"site {site}: its public key cannot be read ({e})")
            return
    try:
        ver = verify_file(path, site=site, trusted_pem=trusted)
    except (LedgerError, OSError) as e:
        res.failures.append(f"ledger: {e}")
        return
    sa.verified = True
    history: list[DpSgdEvent] = []
    for i, entry in enumerate(ver.entries):
        kind = entry.get("kind")
        where = f"site {site}: entry {i} (round {entry.get('round')})"
        if isinstance(entry.get("time"), (int, float)):
            sa.first_time = entry["time"] if sa.first_time is None else sa.first_time
            sa.last_time = entry["time"]
        if "deployed" in entry:
            sa.deployed = bool(entry["deployed"])
        if kind == "no-dp":
            sa.no_dp += 1
            res.failures.append(f"{where}: released WITHOUT differential privacy (the site's own policy, "
                                "dp = false): no DP claim covers this site")
            continue
        if kind == "declined":
            sa.declines += 1
            continue
        if kind != "dp-sgd":
            continue
        sa.releases += 1
        try:
            sigma, q, steps = float(entry["sigma"]), float(entry["sample_rate"]), int(entry["steps"])
            delta, target, claimed = float(entry["delta"]), float(entry["target_epsilon"]), float(entry["epsilon_after"])
        except (KeyError, TypeError, ValueError) as err:
            res.failures.append(f"{where}: missing or malformed field ({err})")
            continue
        if not (sigma > 0 and 0 < q <= 1 and steps >= 0 and 0 < delta < 1):
            res.failures.append(f"{where}: sigma={sigma}, sample_rate={q}, steps={steps}, delta={delta} "
                                "are not a valid DP-SGD release")
            continue
        history.append(DpSgdEvent(sigma, q, steps))
        sa.history.append(DpSgdEvent(sigma, q, steps))
        sa.max_grad_norm = float(entry.get("max_grad_norm", 1.0))
        sa.steps += steps
        sa.delta, sa.target_epsilon = delta, target
        sa.accountant = str(entry.get("accountant", ""))
        sa.adjacency = str(entry.get("adjacency", ""))
        noise = str(entry.get("noise", "?"))
        if noise not in sa.noise:
            sa.noise.append(noise)
        if noise == "seeded" and entry.get("deployed"):
            res.failures.append(f"{where}: dp-noise='seeded' on a deployed site: the coordinator can "
                                "reproduce this noise, so the claimed epsilon does not hold against it")
        prv = sa.recomputed_with == "PLD"
        eps2 = (epsilon_pld if prv else epsilon_rdp)(history, delta)
        sa.rounds.append({"round": entry.get("round"), "claimed": claimed, "recomputed": eps2})
        # PRV and PLD each carry a discretisation error of ~0.01 in epsilon, so an absolute slack too
        if not math.isclose(eps2, claimed, rel_tol=res.tolerance, abs_tol=PLD_SLACK if prv else 1e-6):
            res.failures.append(f"{where}: claimed epsilon {claimed:.4f} but dp_accounting's "
                                f"{sa.recomputed_with} gives {eps2:.4f} (tolerance {res.tolerance:.0%})")
        if eps2 > target * (1 + res.tolerance) + (PLD_SLACK if prv else 0.0) or claimed > target:
            res.failures.append(f"{where}: epsilon {max(eps2, claimed):.4f} overruns the site's budget "
                                f"target-epsilon={target:g}")
        sa.claimed_epsilon = claimed
    if history:
        sa.epsilon_rdp = epsilon_rdp(history, sa.delta)
        sa.epsilon_pld = epsilon_pld(history, sa.delta)
    if "seeded" in sa.noise:
        res.warnings.append(f"site {site}: seeded DP noise — {SEEDED_STATEMENT}")


def _covered(res: AuditResult, run: Path) -> dict[tuple[int, int], set[str]]:
    """Every checkpoint after round 0 must come from deltas each matched by a signed ledger entry;
    return the signed hashes, (site, round) -> delta SHA-256s."""
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"rounds": []}
    rows = {int(r["round"]): r for r in metrics.get("rounds", [])}
    hashes: dict[tuple[int, int], set[str]] = {}
    for site in res.sites:
        path = run / "ledger" / f"site-{site}.jsonl"
        try:
            for e in verify_file(path, site=site).entries:
                if e.get("kind") == "dp-sgd":
                    hashes.setdefault((site, int(e["round"])), set()).add(str(e.get("delta_sha256")))
        except (LedgerError, OSError):
            continue  # already reported
    for ck in sorted((run / "checkpoints").glob("round-*")) if (run / "checkpoints").exists() else []:
        try:
            rnd = int(ck.name.split("-")[1])
        except ValueError:
            continue
        res.checkpoints.append(rnd)
        if rnd == 0:
            continue  # the seeded initial adapter: no data in it
        row = rows.get(rnd)
        if row is None or "merged" not in row:
            res.failures.append(f"checkpoint {ck.name}: metrics.json has no record of the deltas merged in "
                                f"round {rnd}; it is not covered by the ledger")
            continue
        if row.get("skipped"):
            continue
        for site_s, digest in row["merged"].items():
            if digest not in hashes.get((int(site_s), rnd), set()):
                res.failures.append(f"checkpoint {ck.name}: site {site_s}'s delta {digest[:12]}… has no signed "
                                    f"ledger entry for round {rnd}")
    return hashes


def _secure_rounds(res: AuditResult, run: Path, keys: Path, signed: dict[tuple[int, int], set[str]]) -> None:
    """Secure aggregation: the masked vectors, the adverts and the unmasked sum (fedpeft.secagg.audit)."""
    if not (run / "secagg").is_dir():
        return
    from fedpeft.secagg.audit import audit_secure_rounds

    roster = {s: (keys / f"site-{s}.pub").read_text() for s in res.sites if (keys / f"site-{s}.pub").exists()}
    failures, notes = audit_secure_rounds(run, signed=signed, roster=roster)
    res.failures += failures
    res.secure_rounds = notes


def _site_of(path: Path) -> int:
    m = _SITE.search(path.name)
    assert m is not None, path  # the glob matched site-*.jsonl
    return int(m.group(1))


class NotARun(ValueError):
    """The folder is not a fedpeft run: nothing to audit, and nothing is written into it."""


def audit_run(run_dir: str | Path, *, keys_dir: str | Path | None = None,
              tolerance: float = RDP_TOLERANCE) -> AuditResult:
    """Audit a run folder; ``keys_dir`` holds the sites' own ``site-<id>.pub``, obtained from the
    sites out of band (default: the coordinator's copies in ``DIR/ledger``, a qualified trust root)."""
    run = Path(run_dir)
    if not (run / "metrics.json").is_file() and not (run / "ledger").is_dir():
        raise NotARun(f"DIR={str(run)!r}: not a fedpeft run folder (no metrics.json, no ledger/)")
    res = AuditResult(run_dir=str(run), tolerance=tolerance)
    ledger_dir = run / "ledger"
    keys = Path(keys_dir) if keys_dir else ledger_dir
    res.keys_supplied = keys_dir is not None
    res.trust_root = (f"the sites' own public keys, supplied by the auditor ({keys})" if keys_dir else
                      f"the coordinator's copies of the sites' public keys ({ledger_dir}): a coordinator that "
                      "replaced a site's key could have rewritten that site's ledger; compare each fingerprint "
                      "below with the one the site gives you (`fedpeft site CONFIG.toml --fingerprint`), "
                      "then rerun with --keys")
    files = sorted((p for p in ledger_dir.glob("site-*.jsonl") if _SITE.search(p.name)), key=_site_of) \
        if ledger_dir.exists() else []
    if not files and not (ledger_dir / "server.jsonl").exists():
        res.failures.append(f"{ledger_dir}: no site ledgers; this run has no verifiable DP claim "
                            "(was it run with dp=false?)")
    for path in files:
        site = _site_of(path)
        pub = keys / f"site-{site}.pub"
        if not pub.exists():
            res.failures.append(f"site {site}: no registered public key {pub}")
            res.sites[site] = SiteAudit(site=site)
            continue
        _audit_site(res, site, path, pub.read_text())
    server = ledger_dir / "server.jsonl"
    if server.exists():
        _audit_server(res, server, keys / "server.pub")
    _secure_rounds(res, run, keys, _covered(res, run))
    return res


def _audit_server(res: AuditResult, path: Path, pub: Path) -> None:
    """Client-level DP releases: recomputed with Opacus' RDP (training used Flower's, on dp_accounting)."""
    from fedpeft.privacy.accountant import compute_epsilon

    try:
        ver = verify_file(path, site="server", trusted_pem=pub.read_text() if pub.exists() else None)
    except (LedgerError, OSError) as e:
        res.failures.append(f"server ledger: {e}")
        return
    history: list[DpSgdEvent] = []
    claimed, delta, limit, rounds = 0.0, float("nan"), None, []
    for i, entry in enumerate(ver.entries):
        if entry.get("kind") != "client-dp":
            continue
        history.append(DpSgdEvent(float(entry["sigma"]), 1.0, 1))  # no sampling: every site, every release
        delta, claimed, limit = float(entry["delta"]), float(entry["epsilon_after"]), entry.get("target_epsilon")
        eps2 = compute_epsilon(history=history, delta=delta)
        rounds.append({"round": entry.get("round"), "claimed": claimed, "recomputed": eps2})
        where = f"server: entry {i} (round {entry.get('round')})"
        if not math.isclose(eps2, claimed, rel_tol=res.tolerance, abs_tol=1e-6):
            res.failures.append(f"{where}: claimed client-level epsilon {claimed:.4f} but Opacus' RDP gives {eps2:.4f}")
        if limit is not None and max(eps2, claimed) > float(limit) * (1 + res.tolerance):
            res.failures.append(f"{where}: client-level epsilon {max(eps2, claimed):.4f} overruns "
                                f"client-dp-max-epsilon={limit}")
    res.client_level = {"releases": len(history), "claimed_epsilon": claimed, "delta": delta,
                        "epsilon_recomputed": compute_epsilon(history=history, delta=delta) if history else 0.0,
                        "max_epsilon": limit, "rounds": rounds, "adjacency": "add/remove one whole site",
                        "sigma": history[0].noise_multiplier if history else None}


def empirical_audit(res: AuditResult, *, canaries: int = 2000, seed: int | None = None) -> None:
    """Per site: the gradient canaries that ran inside its training (``audit-canaries``; their
    secret labels and scores in ``DIR/sites/site-<id>/canaries.json``) when there are any, else
    canaries through Opacus' DP step with the ledger's own (sigma, q, steps, C); a lower bound
    above the claimed epsilon falsifies the claim (a failure naming the site)."""
    from fedpeft.privacy.audit.canaries import TrainingCanaries, run_gradient_canaries

    sites: dict[str, dict[str, Any]] = {}
    kinds: set[str] = set()
    for s, a in sorted(res.sites.items()):
        if not a.history:
            continue
        inside = Path(res.run_dir) / "sites" / f"site-{s}" / "canaries.json"
        if inside.exists():
            tc = TrainingCanaries.from_json(inside.read_text())
            steinke, fdp = tc.lower_bounds(a.delta)
            lb = max(steinke, fdp)
            kinds.add("in-training")
            sites[str(s)] = {"epsilon_lower_bound": lb, "steinke": steinke, "fdp": fdp, "claimed": a.epsilon_recomputed,
                             "canaries": len(tc.scores), "kind": "in-training"}
            if lb > a.epsilon_recomputed * (1 + res.tolerance):
                res.failures.append(f"site {s}: empirical lower bound epsilon >= {lb:.3f} (95 % confidence) "
                                    f"exceeds the claimed {a.epsilon_recomputed:.3f}: the DP claim is false")
            continue
        sigmas = {h.noise_multiplier for h in a.history}
        rates = {h.sample_rate for h in a.history}
        if len(sigmas) > 1 or len(rates) > 1:
            res.warnings.append(f"site {s}: sigma or q changed between releases; canaries use the first")
        sigma, q = a.history[0].noise_multiplier, a.history[0].sample_rate
        audit = run_gradient_canaries(sigma=sigma, sample_rate=q, steps=a.steps, max_grad_norm=a.max_grad_norm,
                                      canaries=canaries, delta=a.delta, seed=seed)
        lb = max(audit.epsilon_lower_bound, audit.epsilon_lower_bound_fdp)
        kinds.add("mechanism")
        sites[str(s)] = {"epsilon_lower_bound": lb, "steinke": audit.epsilon_lower_bound,
                         "fdp": audit.epsilon_lower_bound_fdp, "claimed": a.epsilon_recomputed, "canaries": canaries,
                         "kind": "mechanism"}
        if lb > a.epsilon_recomputed * (1 + res.tolerance):
            res.failures.append(f"site {s}: empirical lower bound epsilon >= {lb:.3f} (95 % confidence) exceeds "
                                f"the claimed {a.epsilon_recomputed:.3f}: the DP claim is false")
    res.empirical = {
        "method": ("white-box gradient canaries — 'in-training': inserted into the site's real DP-SGD batches "
                   "and scored on its released deltas; 'mechanism': through Opacus' DPOptimizer with the "
                   "site's ledger parameters — with the one-run bounds of Steinke, Nasr & Jagielski (2023) "
                   "and Mahloujifar, Melis & Chaudhuri (2025) at 95 % confidence; the larger is reported"),
        "kinds": sorted(kinds),
        "sites": sites,
        "summary": "; ".join(f"site {k}: lower bound {v['epsilon_lower_bound']:.3f} vs claimed {v['claimed']:.3f} "
                             f"({v['kind']}, {v['canaries']} canaries)"
                             for k, v in sites.items()) or "no DP releases to audit",
    }
