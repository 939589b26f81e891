"""What a signed audit report must pin down besides the epsilons: when, with which software, on
which run config, which released adapter (bound to the run's last checkpoint), and each site's
DP-SGD parameters. Everything here is read from the run folder, never from the coordinator's say."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from fedpeft.privacy.audit.checks import AuditResult

PACKAGES = ("fedpeft", "torch", "transformers", "peft", "opacus", "flwr", "dp-accounting", "cryptography")
ADAPTER_FILE = "adapter_model.safetensors"


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def add_provenance(res: AuditResult) -> None:
    """Fill ``res.provenance``; an adapter that is not the last checkpoint's is a failure."""
    run = Path(res.run_dir)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    config = metrics.get("config", {})
    times = [t for a in res.sites.values() for t in (a.first_time, a.last_time) if t is not None]
    adapter = _sha256(run / "adapter" / ADAPTER_FILE)
    last = max(res.checkpoints, default=None)
    last_sha = _sha256(run / "checkpoints" / f"round-{last:03d}" / ADAPTER_FILE) if last is not None else None
    if adapter is not None and last_sha is not None and adapter != last_sha:
        res.failures.append(f"adapter/{ADAPTER_FILE} (sha256 {adapter[:12]}…) is not the last checkpoint's "
                            f"(round {last}, sha256 {last_sha[:12]}…): the released adapter is not the audited one")
    rows = metrics.get("rounds", [])
    records = {}
    for r in rows:
        for s, m in (r.get("sites") or {}).items():
            if m.get("num_examples"):
                records[int(s)] = int(m["num_examples"])
    sites = {}
    for s, a in sorted(res.sites.items()):
        sigmas = sorted({h.noise_multiplier for h in a.history})
        rates = sorted({h.sample_rate for h in a.history})
        n = records.get(s)
        sites[str(s)] = {"fingerprint": a.fingerprint or None, "sigma": sigmas or None, "sample_rate": rates or None,
                         "max_grad_norm": a.max_grad_norm if a.history else None, "records": n,
                         "expected_batch_size": round(n * rates[0], 1) if n and len(rates) == 1 else None,
                         "deployed": a.deployed}
    res.provenance = {
        "audited_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "first_ledger_time": _iso(min(times)) if times else None,
        "last_ledger_time": _iso(max(times)) if times else None,
        "versions": versions(),
        "run_config": config,
        "run_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest() if config else None,
        "adapter_sha256": adapter, "last_checkpoint": last, "last_checkpoint_sha256": last_sha,
        "adapter_is_last_checkpoint": adapter is not None and adapter == last_sha,
        "sites": sites,
    }
