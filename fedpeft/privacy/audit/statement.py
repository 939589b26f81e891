"""The plain-language privacy statement a privacy officer signs (or refuses to), from an
``AuditResult``: only what the audit verified, per site, with its adjacency, what DP does not
cover, and the trust root. A failed audit says so first, and says what to do next."""

from __future__ import annotations

import math

from fedpeft.privacy.audit.checks import SEEDED_STATEMENT, AuditResult


def known(x: float | None, fmt: str = ".3f") -> str:
    """A number, or 'unknown' (never a 0 or a nan that reads like a value)."""
    return "unknown" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


NOT_COVERED = ("Not covered by DP: the training loss, accuracy, example counts and other metrics each site "
               "reported to the coordinator in the clear (metrics.json), and the fact that a site took part.")
NEXT_STEPS = ("Do not release the adapter or any checkpoint of this run. Next: read the findings; compare each "
              "site's key fingerprint below with the one the site gives you out of band (`fedpeft site "
              "CONFIG.toml --fingerprint`); rerun `fedpeft audit DIR --keys KEYS_DIR` with the keys the sites "
              "gave you.")


def failure_notice(res: AuditResult) -> str:
    return f"The audit FAILED with {len(res.failures)} finding(s): the claim below does not stand. {NEXT_STEPS}"


def site_claims(res: AuditResult) -> list[str]:
    """One sentence per site: its own releases, its own epsilon."""
    out = []
    for s, a in sorted(res.sites.items()):
        if not a.verified:
            out.append(f"Site {s}: ledger NOT verified; no claim.")
        elif a.no_dp:
            out.append(f"Site {s}: released {a.no_dp} update(s) WITHOUT differential privacy (its own policy); "
                       "no claim.")
        elif not a.releases:
            out.append(f"Site {s}: no DP release ({a.declines} declined round(s)); it released nothing.")
        else:
            out.append(f"Site {s}: epsilon = {known(a.epsilon_recomputed)}, delta = {known(a.delta, 'g')} over its "
                       f"own {a.releases} signed release(s) ({a.steps} DP-SGD steps, budget "
                       f"{known(a.target_epsilon, 'g')}).")
    return out


def privacy_statement(res: AuditResult) -> str:
    """The claim, as one paragraph (the report also lists ``site_claims``)."""
    cl = res.client_level
    client = (f" In addition, the server applied client-level DP: any one whole site's contribution changes "
              f"the released adapters by at most epsilon = {cl['epsilon_recomputed']:.3f} (delta = {cl['delta']:g}, "
              f"{cl['releases']} releases, Gaussian noise multiplier {cl['sigma']}, no sampling amplification)."
              if cl.get("releases") else "")
    lead = failure_notice(res) + " " if not res.ok else ""
    if not res.sites:
        return (lead + (client.strip() or "No differential-privacy claim could be verified for this run.")).strip()
    eps = [a.epsilon_recomputed for a in res.sites.values() if a.verified and a.releases and not a.no_dp]
    worst = max((e for e in eps if not math.isnan(e)), default=float("nan"))
    kinds = sorted({s.accountant or "rdp" for s in res.sites.values() if s.releases})
    accounted = ", ".join("PRV accountant (recomputed with PLD)" if k == "prv" else "RDP accountant" for k in kinds)
    deltas = sorted({s.delta for s in res.sites.values() if not math.isnan(s.delta)})
    noise = sorted({n for s in res.sites.values() for n in s.noise})
    text = (f"{lead}Each of the {len(res.sites)} sites trained with DP-SGD (Poisson-sampled Gaussian mechanism, "
            f"{accounted or 'no accountant recorded'}). Protected: any one record (one patient note) of a site. "
            f"Adding or removing it changes everything that site released — every adapter delta it sent, and so "
            f"every checkpoint and the final adapter, which the server's merge computes from those deltas "
            f"(post-processing) — by at most epsilon = {known(worst)} with delta = "
            f"{', '.join(f'{d:g}' for d in deltas) or 'unknown'}: the largest over sites, each composed over its "
            f"own releases only and recomputed independently. This is record-level adjacency: a patient with k "
            f"notes at one site is protected at about k x epsilon (group privacy), not epsilon. {NOT_COVERED} "
            f"Noise source: {', '.join(noise) or 'unknown'}. Trust root: {res.trust_root or 'unknown'}.")
    text += over_budget_within_tolerance(res)
    text += client
    if "seeded" in noise:
        text += f" Seeded noise is {SEEDED_STATEMENT}."
    return text


def over_budget_within_tolerance(res: AuditResult) -> str:
    """Why a passing audit may quote an epsilon a little above a site's budget: the audit recomputes
    with dp_accounting's order grid, the site stayed within budget by Opacus' grid, and both are upper
    bounds on the same mechanism's epsilon (a reader comparing "at most 8.011" with "budget 8" asks)."""
    if not res.ok:
        return ""
    over = [a for _, a in sorted(res.sites.items()) if a.verified and a.releases and not a.no_dp
            and a.epsilon_recomputed > a.target_epsilon >= a.claimed_epsilon]
    if not over:
        return ""
    how = ("RDP uses another grid of orders" if over[0].recomputed_with == "RDP"
           else "PLD discretises the privacy curve another way")
    ids = ", ".join(str(a.site) for a in over)
    pairs = "; ".join(f"site {a.site}: {a.epsilon_recomputed:.4f} recomputed, {a.claimed_epsilon:.4f} by the "
                      f"site's own accountant, budget {a.target_epsilon:g}" for a in over)
    return (f" For site(s) {ids} the recomputed epsilon is slightly above the site's budget ({pairs}). Each "
            f"stayed within its budget by Opacus' accountant; dp_accounting's {how} (the audit's tolerance "
            f"between the two is {res.tolerance:.0%}). Both are "
            f"upper bounds on the epsilon of the same releases, and this statement quotes the larger.")
