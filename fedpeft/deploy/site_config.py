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
path = "/data/notes.csv"                # CSV, JSONL or a saved datasets folder
text-column = "text"
label-column = "label"
labels = ["cardiology", "pulmonology"]  # the federation's shared label list, in order

[privacy]
target-epsilon = 8.0
target-delta = 1e-5
```
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError

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
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    lora_rank: int | None = None
    api_port: int | None = None
    insecure: bool = False
    examples: int = field(default=0, init=False)

    def node_config(self) -> str:
        """Flower's ``--node-config`` string: what the ClientApp reads on this site."""
        items: dict[str, Any] = {
            "site-id": self.site_id, "data-path": str(self.data_path), "state-dir": str(self.state_dir),
            "text-column": self.text_column, "label-column": self.label_column, "labels": ",".join(self.labels),
            "target-epsilon": float(self.target_epsilon), "target-delta": float(self.target_delta),
        }
        if self.lora_rank is not None:
            items["lora-rank"] = self.lora_rank
        return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in items.items())

    def supernode_args(self) -> list[str]:
        args = ["flower-supernode", "--superlink", self.address, "--node-config", self.node_config()]
        if self.insecure:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.ca_cert)]
        if self.auth_key is not None:
            args += ["--auth-supernode-private-key", str(self.auth_key)]
        if self.api_port is not None:
            args += ["--port", str(self.api_port)]
        return args


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
    rel = (lambda p: (base / p) if not Path(p).is_absolute() else Path(p))
    site, coord, data, priv = (raw.get(k, {}) for k in ("site", "coordinator", "data", "privacy"))
    for name, sec in (("site", site), ("coordinator", coord), ("data", data), ("privacy", priv)):
        if not isinstance(sec, dict):
            raise _bad(name, sec, "must be a [table]")
    unknown = set(raw) - {"site", "coordinator", "data", "privacy"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section (known: site, coordinator, data, privacy)")

    site_id = _get(site, "site", "id", int)
    if site_id < 0:
        raise _bad("site.id", site_id, "must be >= 0")
    address = _get(coord, "coordinator", "address", str)
    m = _ADDRESS.match(address)
    if not m or not 1 <= int(m.group("port")) <= 65535:
        raise _bad("coordinator.address", address, "must be host:port with a port in 1-65535")
    cfg = SiteConfig(
        site_id=site_id, state_dir=rel(_get(site, "site", "state-dir", str)), address=address,
        data_path=rel(_get(data, "data", "path", str)), labels=list(_get(data, "data", "labels", list)),
        text_column=_get(data, "data", "text-column", str, "text"),
        label_column=_get(data, "data", "label-column", str, "label"),
        target_epsilon=_get(priv, "privacy", "target-epsilon", float, 8.0),
        target_delta=_get(priv, "privacy", "target-delta", float, 1e-5),
        lora_rank=_get(site, "site", "lora-rank", int, None), api_port=_get(site, "site", "api-port", int, None),
        insecure=insecure,
    )
    if not cfg.labels or not all(isinstance(x, str) and x for x in cfg.labels):
        raise _bad("data.labels", cfg.labels, "must be a non-empty list of class names")
    if len(set(cfg.labels)) != len(cfg.labels):
        raise _bad("data.labels", cfg.labels, "has duplicates")
    if not cfg.target_epsilon > 0:
        raise _bad("privacy.target-epsilon", cfg.target_epsilon, "must be > 0")
    if not 0 < cfg.target_delta < 1:
        raise _bad("privacy.target-delta", cfg.target_delta, "must be in (0, 1)")
    if cfg.lora_rank is not None and cfg.lora_rank < 1:
        raise _bad("site.lora-rank", cfg.lora_rank, "must be >= 1")
    if cfg.api_port is not None and not 1 <= cfg.api_port <= 65535:
        raise _bad("site.api-port", cfg.api_port, "must be in 1-65535")
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
