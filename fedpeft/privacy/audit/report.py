"""Writes ``DIR/audit/report.{json,md,html}`` and ``epsilon.png`` from an ``AuditResult``: a report
an officer can sign. A failure comes first; unknown values read "unknown"; the HTML is the
Markdown rendered by markdown-it (tables, lists, code), styled, with the plot embedded."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from fedpeft.io import atomic_write_bytes, atomic_write_json
from fedpeft.privacy.audit.checks import AuditResult
from fedpeft.privacy.audit.statement import NEXT_STEPS, known, privacy_statement, site_claims

SIGN_OFF = ["## Sign-off", "",
            "I have compared each site's key fingerprint above with the one the site gave me out of band, "
            "and I have read this report.", "",
            "| Privacy officer | Entry |", "|---|---|", *(f"| {k} | {'_' * 40} |" for k in ("Name", "Role", "Date",
                                                                                          "Signature")), ""]


def _verdict_line(res: AuditResult) -> str:
    why = {"PASS": "signatures checked against the sites' own keys, supplied by the auditor",
           "QUALIFIED PASS": "signatures checked only against the coordinator's copies of the sites' keys",
           "FAIL": "see the failures below"}[res.verdict]
    return f"**Result: {res.verdict}** — {why}; {len(res.failures)} failure(s), {len(res.warnings)} warning(s)."


def _sites_table(res: AuditResult) -> list[str]:
    emp = res.empirical.get("sites", {})
    prov = res.provenance.get("sites", {})
    lines = ["| site | ledger | releases | declined | steps | noise | σ | q | C | records | batch (expected) | "
             "δ | budget ε | accountant | claimed ε | ε recomputed (RDP) | ε (PLD) | empirical lower bound |",
             "|" + "---|" * 18]
    for s, a in sorted(res.sites.items()):
        p = prov.get(str(s), {})
        lb = emp.get(str(s), {}).get("epsilon_lower_bound")
        sig = ", ".join(f"{x:.4g}" for x in p.get("sigma") or []) or "unknown"
        q = ", ".join(f"{x:.4g}" for x in p.get("sample_rate") or []) or "unknown"
        lines.append(f"| {s} | {'verified' if a.verified else '**NOT verified**'} | {a.releases} | {a.declines} | "
                     f"{a.steps} | {', '.join(a.noise) or 'unknown'} | {sig} | {q} | "
                     f"{known(p.get('max_grad_norm'), 'g')} | {known(p.get('records'), 'd')} | "
                     f"{known(p.get('expected_batch_size'), 'g')} | {known(a.delta, 'g')} | "
                     f"{known(a.target_epsilon, 'g')} | {a.accountant or 'unknown'} | {known(a.claimed_epsilon, '.4f')} | "
                     f"{known(a.epsilon_rdp, '.4f')} | {known(a.epsilon_pld, '.4f')} | {known(lb)} |")
    return lines


def _markdown(res: AuditResult) -> str:
    p = res.provenance
    failures = ["## Failures", ""] + ([f"- {f}" for f in res.failures] or ["- none"]) + [""]
    lines = [f"# Privacy audit of `{res.run_dir}`", "", _verdict_line(res), ""]
    if not res.ok:
        lines += [f"**{NEXT_STEPS}**", ""] + failures
    lines += ["## Claim (does NOT stand)" if not res.ok else "## Statement", "", privacy_statement(res), ""]
    lines += [f"- {c}" for c in site_claims(res)] + [""]
    lines += ["## Trust root", "", res.trust_root or "unknown", "",
              "| site | ledger key fingerprint (SHA-256 of the public key) |", "|---|---|"]
    lines += [f"| {s} | `{a.fingerprint or 'unknown'}` |" for s, a in sorted(res.sites.items())] + [""]
    kind = res.run_kind
    kind_text = {"simulation": "a simulation: one operator played every site, and the sites' private keys sit "
                               "in the run folder (`sites/`), so the ledgers prove the mechanics, not who ran them",
                 "deployment": "a deployment: each site kept its own private key"}.get(kind, kind)
    v = p.get("versions", {})
    lines += ["## Run", "",
              f"- Kind: {kind_text}.",
              f"- Audited at: {p.get('audited_at', 'unknown')}; ledgers from {p.get('first_ledger_time') or 'unknown'} "
              f"to {p.get('last_ledger_time') or 'unknown'} (the sites' clocks).",
              f"- Run config sha256: `{p.get('run_config_sha256') or 'unknown'}` (the config itself is in report.json).",
              f"- Released adapter sha256: `{p.get('adapter_sha256') or 'none'}`; last checkpoint: round "
              f"{p.get('last_checkpoint', 'unknown')}, sha256 `{p.get('last_checkpoint_sha256') or 'none'}` — "
              f"{'the same file' if p.get('adapter_is_last_checkpoint') else 'NOT the same file'}.",
              f"- Checkpoints checked: {', '.join(map(str, res.checkpoints)) or 'none'}.",
              "- Software: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]
    lines += ["## Sites", ""] + _sites_table(res) + [
        "", f"Each claim is recomputed by the same method in a separate implementation: an Opacus RDP claim with "
            f"dp_accounting's RDP, an Opacus PRV claim with dp_accounting's PLD. Tolerance: {res.tolerance:.0%} "
            "relative (PLD: and 0.02 absolute). Records and batch sizes come from the sites' reports (not "
            "covered by DP).", "", "![ε per round per site](epsilon.png)", ""]
    cl = res.client_level
    if cl:
        lines += ["## Client-level DP (one whole site)", "",
                  f"{cl['releases']} server releases, noise multiplier {cl['sigma']}, delta {cl['delta']:g}: "
                  f"claimed epsilon {cl['claimed_epsilon']:.4f}, recomputed {cl['epsilon_recomputed']:.4f} "
                  f"(Opacus RDP, q = 1), budget {cl['max_epsilon'] or 'none'}.", ""]
    if res.secure_rounds or (Path(res.run_dir) / "secagg").is_dir():
        lines += ["## Secure aggregation", "", SECURE_TEXT, ""] + [f"- {n}" for n in res.secure_rounds] + [""]
    if res.empirical:
        lines += ["## Empirical audit", "", res.empirical.get("summary", ""), ""]
    if res.ok:
        lines += failures
    lines += ["## Warnings", ""] + ([f"- {w}" for w in res.warnings] or ["- none"]) + [""] + SIGN_OFF
    return "\n".join(lines) + "\n"


SECURE_TEXT = (
    "The sites masked their updates (pairwise and self masks, t-of-n Shamir shares; `docs/secagg.md`). "
    "The coordinator saw: which sites took part and survived each stage, their signed key adverts and ledgers "
    "(ε, steps), each masked vector and masked range vector (uniformly random on its own), two sums from the "
    "range stage (of the sites' largest weighted coordinates, and of their weights) and the weighted sum of the "
    "updates. It did not see any site's update, example count, loss or local accuracy. Checks a secure round "
    "cannot do: the per-coordinate update bound, each update's norm and the robust merges (they need "
    "individual updates). Checked here, per round: every range vector (or, with distributed DP, masked "
    "vector) is the one its site's ledger signed, every masked vector matches a ledger entry of its site "
    "binding it to that range vector and to the round's ring, the ring is the one the range vectors' sum gives, every "
    "key advert verifies against the trust root above, and the masked sum unmasked with the recorded "
    "reconstruction equals the checkpoint's update within the ring's step and float32 rounding.")


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;line-height:1.45;
color:#1b1b1b}table{border-collapse:collapse;display:block;overflow-x:auto;margin:.5em 0}
th,td{border:1px solid #bbb;padding:.3em .5em;text-align:left;vertical-align:top;white-space:nowrap}
th{background:#eef1f5}code{background:#f2f2f2;padding:0 .2em;word-break:break-all;white-space:normal}
.verdict{font-size:1.3em;padding:.5em .8em;border-radius:6px}.PASS{background:#dff3e3;border:2px solid #2e7d32}
.QUALIFIED{background:#fff4d6;border:2px solid #b7791f}.FAIL{background:#fde2e1;border:2px solid #c62828}
img{max-width:100%}@media (max-width:800px){body{font-size:15px}}"""


def _html(md: str, res: AuditResult, plot: Path) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(md)
    cls = res.verdict.split()[0]
    first = body.index("<p>")  # the verdict paragraph, styled
    end = body.index("</p>", first)
    body = body[:first] + f'<p class="verdict {cls}">' + body[first + 3:end] + body[end:]
    if plot.exists():
        data = base64.b64encode(plot.read_bytes()).decode()
        body = body.replace('src="epsilon.png"', f'src="data:image/png;base64,{data}"')
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>fedpeft privacy audit: {html.escape(res.verdict)}</title><style>{CSS}</style></head>"
            f"<body>{body}</body></html>")


def _plot(res: AuditResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    markers = "osD^vP*X"
    for i, (s, a) in enumerate(sorted(res.sites.items())):
        if not a.rounds:
            continue
        r = [x["round"] for x in a.rounds]
        # sites often spend identical budgets: distinct markers and a small offset keep each visible
        off = (i - (len(res.sites) - 1) / 2) * 0.04
        line, = ax.plot([x + off for x in r], [x["recomputed"] for x in a.rounds], marker=markers[i % len(markers)],
                        label=f"site {s}", alpha=0.85)
        ax.plot(r, [x["claimed"] for x in a.rounds], ls=":", color=line.get_color())
        if a.target_epsilon == a.target_epsilon:
            ax.axhline(a.target_epsilon, color=line.get_color(), ls="--", lw=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (solid: audit's accountant, dotted: claimed)")
    ax.set_title("ε per round per site (dashed: budgets)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(res: AuditResult, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    md = _markdown(res)
    _plot(res, out / "epsilon.png")
    atomic_write_json(out / "report.json", res.to_json())
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "report.html", _html(md, res, out / "epsilon.png").encode())
    return out
