"""A data site's config file (``fedpeft site CONFIG.toml``): validated in full before anything
connects, every error naming the field and the value, then turned into Flower's own
``flower-supernode`` command line.

```toml
[site]
id = 0                                  # this site's id in the federation
state-dir = "/var/lib/fedpeft/site-0"   # privacy state, ledger and its Ed25519 ledger key
lora-rank = 8                           # optional: one of the run's lora-ranks
api-port = 9094                         # optional: this SuperNode's local API port

[coordinator]
address = "coordinator.example.org:9092"  # the SuperLink's Fleet API
ca-cert = "certs/ca.crt"                  # the federation CA (TLS)
auth-key = "certs/site-0/auth"            # this site's node-authentication key (EC, OpenSSH)

[data]
task = "classification"                 # or "causal-lm": then path is a JSONL/CSV of instruction/input/output
                                        # or chat "messages" rows, and the three keys below are not used
path = "/data/notes.csv"                # CSV, JSONL or a saved datasets folder
text-column = "text"
label-column = "label"
labels = ["cardiology", "pulmonology"]  # the federation's shared label list, in order

[privacy]                               # this site's own policy: no run config can weaken it
dp = true                               # only this file can turn DP off (replies and ledger then say so)
target-epsilon = 8.0                    # the most this site spends; a run asking for more is refused
target-delta = 1e-5

[app]
trusted = ["<sha256 of the app>"]       # `fedpeft app-hash DIR`: this site runs no other app
```
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fedpeft.config import TASK_NAMES, ConfigError

_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {why}")


@dataclass
class SiteConfig:
    site_id: int
    state_dir: Path
    address: str
    data_path: Path
    labels: list[str]
    text_column: str = "text"
    label_column: str = "label"
    ca_cert: Path | None = None
    auth_key: Path | None = None
    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    trusted_apps: list[str] = field(default_factory=list)
    lora_rank: int | None = None
    api_port: int | None = None
    insecure: bool = False
    task: str = "classification"
    secagg_roster: Path | None = None  # the federation's roster of ledger keys (secure aggregation)
    examples: int = field(default=0, init=False)

    def node_config(self) -> str:
        """Flower's ``--node-config`` string: what the ClientApp reads on this site."""
        items: dict[str, Any] = {
            "site-id": self.site_id, "data-path": str(self.data_path), "state-dir": str(self.state_dir),
            "task": self.task,
            "dp": "true" if self.dp else "false",
            "target-epsilon": float(self.target_epsilon), "target-delta": float(self.target_delta),
        }
        if self.task == "classification":
            items.update({"text-column": self.text_column, "label-column": self.label_column,
                          "labels": ",".join(self.labels)})
        if self.lora_rank is not None:
            items["lora-rank"] = self.lora_rank
        if self.secagg_roster is not None:
            items["secagg-roster"] = str(self.secagg_roster)
        return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in items.items())

    def supernode_args(self) -> list[str]:
        """``flower-supernode``'s arguments, run through ``fedpeft.deploy.supernode`` (the same
        SuperNode, whose replies never wait for the next pull)."""
        args = [sys.executable, "-m", "fedpeft.deploy.supernode", "--superlink", self.address,
                "--node-config", self.node_config()]
        if self.insecure:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.ca_cert)]
        if self.auth_key is not None:
            args += ["--auth-supernode-private-key", str(self.auth_key)]
        if self.api_port is not None:
            args += ["--port", str(self.api_port)]
        return args


SCHEMA: dict[str, tuple[str, ...]] = {
    "site": ("id", "state-dir", "lora-rank", "api-port"),
    "coordinator": ("address", "ca-cert", "auth-key"),
    "data": ("task", "path", "text-column", "label-column", "labels"),
    "privacy": ("dp", "target-epsilon", "target-delta"),
    "app": ("trusted",),
    "secagg": ("roster",),
}


def _unknown(name: str, known: tuple[str, ...], what: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{name}: unknown {what} ({hint}known: {', '.join(known)})")


def _check_keys(raw: dict[str, Any]) -> None:
    """Every section and every key is known: a typo must never fall back to a default silently."""
    for sec, body in raw.items():
        if sec not in SCHEMA:
            raise _unknown(sec, tuple(SCHEMA), "section")
        if not isinstance(body, dict):
            raise _bad(sec, body, "must be a [table]")
        for key in body:
            if key not in SCHEMA[sec]:
                raise _unknown(f"{sec}.{key}", tuple(f"{sec}.{k}" for k in SCHEMA[sec]), "key")


def _get(section: dict, name: str, key: str, typ: type, default: Any = ...) -> Any:
    if key not in section:
        if default is ...:
            raise ConfigError(f"{name}.{key}: missing (required)")
        return default
    value = section[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise _bad(f"{name}.{key}", value, f"must be {typ.__name__}")
    return value


def load_site_config(path: str | Path, *, insecure: bool = False) -> SiteConfig:
    """Read and validate everything a site needs before it connects; relative paths are relative
    to the config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"CONFIG={str(path)!r}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    base = path.parent.resolve()

    def rel(p: str) -> Path:
        return (base / p) if not Path(p).is_absolute() else Path(p)

    _check_keys(raw)
    site, coord, data, priv, app, sec = (raw.get(k, {}) for k in ("site", "coordinator", "data", "privacy", "app",
                                                                  "secagg"))

    site_id = _get(site, "site", "id", int)
    if site_id < 0:
        raise _bad("site.id", site_id, "must be >= 0")
    address = _get(coord, "coordinator", "address", str)
    m = _ADDRESS.match(address)
    if not m or not 1 <= int(m.group("port")) <= 65535:
        raise _bad("coordinator.address", address, "must be host:port with a port in 1-65535")
    task = _get(data, "data", "task", str, "classification")
    if task not in TASK_NAMES:
        raise _bad("data.task", task, f"must be one of {', '.join(TASK_NAMES)}")
    cfg = SiteConfig(
        site_id=site_id, state_dir=rel(_get(site, "site", "state-dir", str)), address=address, task=task,
        data_path=rel(_get(data, "data", "path", str)),
        labels=list(_get(data, "data", "labels", list, [] if task == "causal-lm" else ...)),
        text_column=_get(data, "data", "text-column", str, "text"),
        label_column=_get(data, "data", "label-column", str, "label"),
        dp=_get(priv, "privacy", "dp", bool, True),
        trusted_apps=list(_get(app, "app", "trusted", list, [])),
        target_epsilon=_get(priv, "privacy", "target-epsilon", float, 8.0),
        target_delta=_get(priv, "privacy", "target-delta", float, 1e-5),
        lora_rank=_get(site, "site", "lora-rank", int, None), api_port=_get(site, "site", "api-port", int, None),
        insecure=insecure,
        secagg_roster=rel(_get(sec, "secagg", "roster", str)) if "roster" in sec else None,
    )
    if task == "classification" and (not cfg.labels or not all(isinstance(x, str) and x for x in cfg.labels)):
        raise _bad("data.labels", cfg.labels, "must be a non-empty list of class names")
    if len(set(cfg.labels)) != len(cfg.labels):
        raise _bad("data.labels", cfg.labels, "has duplicates")
    if not cfg.target_epsilon > 0:
        raise _bad("privacy.target-epsilon", cfg.target_epsilon, "must be > 0")
    if not 0 < cfg.target_delta < 1:
        raise _bad("privacy.target-delta", cfg.target_delta, "must be in (0, 1)")
    for h in cfg.trusted_apps:
        if not isinstance(h, str) or not re.fullmatch(r"[0-9a-f]{64}", h):
            raise _bad("app.trusted", h, "must be a list of SHA-256 app hashes, 64 lowercase hex digits "
                                         "(`fedpeft app-hash DIR` prints one)")
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise _bad("site.lora-rank", cfg.lora_rank, "must be >= 1")
    if cfg.api_port is not None and not 1 <= cfg.api_port <= 65535:
        raise _bad("site.api-port", cfg.api_port, "must be in 1-65535")
    if not cfg.trusted_apps and not insecure:
        raise ConfigError("app.trusted: missing; a site runs only the Flower apps it pinned, since a run's "
                          "ClientApp is code this machine executes (`fedpeft app-hash DIR` prints an app's hash)")
    _check_security(cfg, coord, rel)
    _check_data(cfg)
    return cfg


def _check_security(cfg: SiteConfig, coord: dict, rel) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if "auth-key" in coord:
        cfg.auth_key = rel(_get(coord, "coordinator", "auth-key", str))
        try:
            key = load_ssh_private_key(cfg.auth_key.read_bytes(), None)
        except TypeError:  # cryptography: "Password was not given but private key is encrypted"
            raise _bad("coordinator.auth-key", str(cfg.auth_key),
                       "is protected by a passphrase, which flower-supernode cannot read; make an "
                       f"unencrypted key with `ssh-keygen -t ecdsa -b 384 -N \"\" -f {cfg.auth_key}` (keep it "
                       "0600) or use the one `fedpeft certs` made") from None
        except (OSError, ValueError) as e:
            raise _bad("coordinator.auth-key", str(cfg.auth_key), f"cannot read an OpenSSH private key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise _bad("coordinator.auth-key", str(cfg.auth_key), "must be an EC key (fedpeft certs makes one)")
    if cfg.insecure:
        return
    if "ca-cert" not in coord:
        raise ConfigError("coordinator.ca-cert: missing; a site only connects over TLS "
                          "(use --insecure for local testing only)")
    cfg.ca_cert = rel(_get(coord, "coordinator", "ca-cert", str))
    try:
        x509.load_pem_x509_certificate(cfg.ca_cert.read_bytes())
    except (OSError, ValueError) as e:
        raise _bad("coordinator.ca-cert", str(cfg.ca_cert), f"cannot read a PEM certificate ({e})") from None


def _check_data(cfg: SiteConfig) -> None:
    from fedpeft.data.loaders import DataLoadError, load_labelled_texts

    if not cfg.data_path.exists():
        raise _bad("data.path", str(cfg.data_path), "no such file or folder")
    if cfg.task == "causal-lm":
        from fedpeft.data.instructions import load_instructions

        try:
            cfg.examples = len(load_instructions(cfg.data_path)[0])
        except DataLoadError as e:
            raise ConfigError(f"data.path: {e}") from None
        return
    try:
        texts, _ = load_labelled_texts(cfg.data_path, labels=cfg.labels, text_column=cfg.text_column,
                                       label_column=cfg.label_column)
    except DataLoadError as e:
        msg = str(e)
        key = ("data.label-column" if repr(cfg.label_column) in msg and "missing column" in msg else
               "data.text-column" if repr(cfg.text_column) in msg and "missing column" in msg else
               "data.labels" if "unknown label" in msg else "data.path")
        raise ConfigError(f"{key}: {msg}") from None
    cfg.examples = len(texts)
