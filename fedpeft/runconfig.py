"""The one place that turns Flower's flat kebab-case run config into ``fedpeft.config``'s
dataclasses, and back (the flat form travels in every ConfigRecord)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from fedpeft.config import SECTIONS, ConfigError, RunConfig, bad

__all__ = ["from_run_config", "known_keys", "parse_overrides", "to_run_config", "ConfigError"]


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Flower run configs carry bool/int/float/str; accept the obvious conversions only."""
    typ = {"bool": bool, "int": int, "float": float, "str": str}.get(typ, typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad(key, value, "must be a boolean")
    if typ is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise bad(key, value, "must be an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad(key, value, "must be an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise bad(key, value, "must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad(key, value, "must be a number") from None
    if typ is str:
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)
    return value


def known_keys() -> dict[str, tuple[str, str]]:
    """kebab-case key -> (section, attribute)."""
    out: dict[str, tuple[str, str]] = {"preset": ("", "preset")}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            out[f.metadata["key"]] = (section, f.name)
    return out


def from_run_config(flat: Mapping[str, Any], *, strict: bool = True) -> RunConfig:
    """Build a validated ``RunConfig`` from Flower's flat kebab-case run config.

    Unknown keys raise (``strict``) so a typo never silently falls back to a default;
    Flower's own keys such as ``server-round`` are ignored.
    """
    keys = known_keys()
    kwargs: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    preset = "hospitals"
    for key, value in flat.items():
        if key in ("server-round", "attempt", "secagg-participants"):  # per-message keys, not settings
            continue
        if key not in keys:
            if strict:
                raise bad(key, value, f"unknown config key; known keys: {', '.join(sorted(keys))}")
            continue
        section, attr = keys[key]
        if not section:
            preset = str(value)
            continue
        ftype = {f.name: f.type for f in fields(SECTIONS[section])}[attr]
        kwargs[section][attr] = _coerce(key, value, ftype)
    built = {s: SECTIONS[s](**kw) for s, kw in kwargs.items()}
    return RunConfig(preset=preset, **built)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` overrides in Flower's ``--run-config`` syntax (TOML values; bare words are strings),
    for tools that run without Flower installed."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items or []:
        for token in item.split():
            key, sep, value = token.partition("=")
            if not sep or not key:
                raise bad("run-config", token, "must be key=value")
            try:
                out[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = value.strip("'\"")
    return out


def to_run_config(cfg: RunConfig) -> dict[str, Any]:
    """Inverse of ``from_run_config``: flat kebab-case dict (travels in a ConfigRecord)."""
    out: dict[str, Any] = {"preset": cfg.preset}
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            out[f.metadata["key"]] = getattr(obj, f.name)
    return out

