"""A deployed site's privacy policy: its own, from its own file, never from the coordinator.

The SuperNode's node config (written by ``fedpeft site CONFIG.toml`` from the site's file) carries
``dp``, ``target-epsilon`` and ``target-delta``; a SuperNode started without them gets the secure
defaults below, never the run's. A run config that asks a deployed site for less privacy than
its policy allows (DP off, a larger epsilon or delta, reproducible noise, injected faults or
canaries, answer-head statistics read from a file) is refused before any training, naming the key. A run that asks for *more* privacy (a
smaller budget) is honoured. Only the site's own file can turn DP off; its replies and ledger
entries then say so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from fedpeft.config import ConfigError, RunConfig


class PolicyError(RuntimeError):
    """The run config asks this site for less privacy than its own policy allows."""


class SiteError(RuntimeError):
    """This site cannot take part (missing or malformed data); the message names the site."""


def _flag(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"{key}={value!r}: must be true or false (node config)")


@dataclass(frozen=True)
class SitePolicy:
    """What this site allows: DP on or off, and the largest (epsilon, delta) it will spend."""

    dp: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ConfigError(f"target-epsilon={self.target_epsilon!r}: must be > 0 (node config)")
        if not 0 < self.target_delta < 1:
            raise ConfigError(f"target-delta={self.target_delta!r}: must be in (0, 1) (node config)")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object]) -> SitePolicy:
        base = cls()
        return cls(dp=_flag(node_config.get("dp", base.dp), "dp"),
                   target_epsilon=float(node_config.get("target-epsilon", base.target_epsilon)),  # type: ignore[arg-type]
                   target_delta=float(node_config.get("target-delta", base.target_delta)))  # type: ignore[arg-type]

    def describe(self) -> str:
        return (f"DP on, at most epsilon={self.target_epsilon:g}, delta={self.target_delta:g}" if self.dp
                else "DP OFF (the site's own choice): its releases carry no privacy guarantee")

    def enforce(self, cfg: RunConfig) -> RunConfig:
        """The run config this site trains with, or PolicyError naming the key that asks for less."""
        p = cfg.privacy
        if not self.dp:  # the site's own choice; injected faults and attacks stay refused
            cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(p, enabled=False))
            check_noise_source(cfg, deployed=True)
            return cfg
        where = "(this site's policy, from its own file: privacy.{} in `fedpeft site CONFIG.toml`)"
        if not p.enabled:
            raise PolicyError(f"dp=false: the run config asks this site to train without differential "
                              f"privacy; refused {where.format('dp')}")
        if p.target_epsilon > self.target_epsilon:
            raise PolicyError(f"target-epsilon={p.target_epsilon:g}: the run config asks for more than this "
                              f"site's budget epsilon={self.target_epsilon:g}; refused "
                              f"{where.format('target-epsilon')}")
        if p.target_delta > self.target_delta:
            raise PolicyError(f"target-delta={p.target_delta:g}: the run config asks for more than this "
                              f"site's delta={self.target_delta:g}; refused {where.format('target-delta')}")
        check_noise_source(cfg, deployed=True)
        check_public_calibration(cfg)
        return cfg


BUILT_IN_CALIBRATION = ("referrals",)  # fedpeft.methods.answer_head: public prompts generated, not read


def check_public_calibration(cfg: RunConfig) -> None:
    """The answer head whitens by statistics of ``answer-head-calibration``; DP bounds one record
    only if they do not depend on the site's data. A file the coordinator names could be this site's
    own, so a deployed site takes only the built-in public generators."""
    source = cfg.adapter.answer_head_calibration
    if cfg.adapter.answer_head and source not in BUILT_IN_CALIBRATION:
        raise PolicyError(f"answer-head-calibration={source!r}: a file the run config names could hold this "
                          "site's own records, and statistics of private records would void the per-record DP "
                          f"bound; refused on a deployed site (use one of {', '.join(BUILT_IN_CALIBRATION)})")


def check_noise_source(cfg: RunConfig, *, deployed: bool) -> None:
    """A deployed site never uses DP noise the coordinator could reproduce from the run config, and
    never obeys the simulation-only fault and attack injection a run config could ask for."""
    fed = cfg.federation
    asked = {"attack": fed.attack != "none", "fault-crash": fed.fault_crash > 0, "fault-hang": fed.fault_hang > 0,
             "fault-late": fed.fault_late > 0, "audit-canaries": cfg.privacy.audit_canaries > 0}
    values = {"attack": repr(fed.attack), "fault-crash": fed.fault_crash, "fault-hang": fed.fault_hang,
              "fault-late": fed.fault_late, "audit-canaries": cfg.privacy.audit_canaries}
    if deployed and any(asked.values()):
        keys = " ".join(f"{k}={values[k]}" for k, on in asked.items() if on)
        raise PolicyError(f"{keys}: fault, attack and canary injection are for simulations; refused on a "
                          "deployed site")
    site_noise = cfg.privacy.enabled or (cfg.privacy.client_dp and fed.secure_aggregation)  # DP-SGD or a Skellam share
    if deployed and site_noise and cfg.privacy.noise == "seeded":
        raise PolicyError("dp-noise='seeded': refused on a deployed site (anyone with the run seed, the "
                          "coordinator included, could regenerate and subtract the noise); use dp-noise='secret'")


NODE_KEYS = {"text-column": ("data", "text_column", str), "label-column": ("data", "label_column", str)}


def apply_node_config(cfg: RunConfig, node_config: Mapping[str, object], *, deployed: bool) -> RunConfig:
    """A deployed site's own settings win over the run's: its file's columns, and its privacy
    policy (a run config that asks for less is refused). Its label list must be the run's (same
    classes, same order) or it cannot take part. Torch-free, like this module: a ClientApp refuses
    a run before it imports the model stack (~10 s of CPU per process on a 2-core machine)."""
    task = node_config.get("task")
    if task is not None and str(task) != cfg.model.task:
        raise SiteError(f"task={cfg.model.task!r} (run config) but this site's data is for task={task!r} "
                        "(its [data] task)")
    labels = node_config.get("labels")
    if labels is not None:
        mine = [x.strip() for x in str(labels).split(",") if x.strip()]
        if mine != list(cfg.data.label_list):
            raise SiteError(f"labels={','.join(mine)!r} (node config) differ from the run's labels="
                            f"{','.join(cfg.data.label_list)!r}: a site cannot renumber classes")
    out = cfg
    for key, (section, attr, typ) in NODE_KEYS.items():
        if key in node_config:
            sec = dataclasses.replace(getattr(out, section), **{attr: typ(node_config[key])})
            out = dataclasses.replace(out, **{section: sec})
    return SitePolicy.from_node_config(node_config).enforce(out) if deployed else out
