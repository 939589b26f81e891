"""Writes ``DIR/audit/report.{json,md,html}`` and ``epsilon.png`` from an ``AuditResult``."""

from __future__ import annotations

import html
from pathlib import Path

from fedpeft.io import atomic_write_bytes, atomic_write_json
from fedpeft.privacy.audit.checks import AuditResult, privacy_statement


def _markdown(res: AuditResult) -> str:
    lines = [f"# Privacy audit of `{res.run_dir}`", "",
             f"**Result: {'PASS' if res.ok else 'FAIL'}** — {len(res.failures)} failure(s), "
             f"{len(res.warnings)} warning(s).", "", "## Statement", "", privacy_statement(res), "",
             "## Sites", "",
             "| site | ledger | releases | declined | steps | noise | delta | target ε | accountant | claimed ε | "
             "ε recomputed (RDP, dp_accounting) | ε (PLD) | empirical lower bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    emp = res.empirical.get("sites", {})
    for s, a in sorted(res.sites.items()):
        lb = emp.get(str(s), {}).get("epsilon_lower_bound")
        lines.append(f"| {s} | {'verified' if a.verified else 'NOT verified'} | {a.releases} | {a.declines} | "
                     f"{a.steps} | {', '.join(a.noise) or '-'} | {a.delta:g} | {a.target_epsilon:g} | {a.accountant or '-'} | "
                     f"{a.claimed_epsilon:.4f} | {a.epsilon_rdp:.4f} | {a.epsilon_pld:.4f} | "
                     f"{'-' if lb is None else f'{lb:.3f}'} |")
    lines += ["", f"Each claim is recomputed by the same method in a separate implementation: an Opacus RDP claim "
              f"with dp_accounting's RDP, an Opacus PRV claim with dp_accounting's PLD. Tolerance: "
              f"{res.tolerance:.0%} relative (PLD: and 0.02 absolute). Checkpoints checked: "
              f"{res.checkpoints or 'none'}.", ""]
    cl = res.client_level
    if cl:
        lines += ["## Client-level DP (one whole site)", "",
                  f"{cl['releases']} server releases, noise multiplier {cl['sigma']}, delta {cl['delta']:g}: "
                  f"claimed epsilon {cl['claimed_epsilon']:.4f}, recomputed {cl['epsilon_recomputed']:.4f} "
                  f"(Opacus RDP, q = 1), budget {cl['max_epsilon'] or 'none'}.", ""]
    if res.empirical:
        lines += ["## Empirical audit", "", res.empirical.get("summary", ""), ""]
    lines += ["## Failures", ""] + ([f"- {f}" for f in res.failures] or ["- none"])
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in res.warnings] or ["- none"])
    return "\n".join(lines) + "\n"


def _html(md: str) -> str:
    """The markdown, as a self-contained page (a table renderer is not worth a dependency)."""
    body = []
    for line in md.splitlines():
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("|---"):
            continue
        elif line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    out, in_table = [], False
    for b in body:
        if b.startswith("<tr>") and not in_table:
            out.append("<table border=1 cellspacing=0 cellpadding=4>")
            in_table = True
        if not b.startswith("<tr>") and in_table:
            out.append("</table>")
            in_table = False
        out.append(b)
    if in_table:
        out.append("</table>")
    return ("<!doctype html><meta charset=utf-8><title>fedpeft privacy audit</title>"
            "<body style='font-family:sans-serif'>" + "\n".join(out) + "</body>")


def _plot(res: AuditResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for s, a in sorted(res.sites.items()):
        if not a.rounds:
            continue
        r = [x["round"] for x in a.rounds]
        line, = ax.plot(r, [x["recomputed"] for x in a.rounds], marker="o", label=f"site {s}")
        ax.plot(r, [x["claimed"] for x in a.rounds], ls=":", color=line.get_color())
        if a.target_epsilon == a.target_epsilon:
            ax.axhline(a.target_epsilon, color=line.get_color(), ls="--", lw=0.6)
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
    atomic_write_json(out / "report.json", res.to_json())
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "report.html", _html(md).encode())
    _plot(res, out / "epsilon.png")
    return out
