"""How the stage messages carry shares: parallel lists in a Flower ``ConfigRecord`` (site ids,
then raw bytes), not hex inside JSON, which doubled every share on the wire. Malformed records
raise ``ValueError`` naming the field, so the coordinator drops that site and the round goes on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KINDS = ("b", "s")  # a survivor's self-mask seed share, a dropped site's mask-key share


def _pairs(rec: Mapping[str, Any], ids: str, blobs: str) -> list[tuple[int, bytes]]:
    a, b = rec.get(ids), rec.get(blobs)
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        raise ValueError(f"{ids}/{blobs}: two lists of one length expected, got {type(a).__name__}/{type(b).__name__}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in a) or not all(isinstance(x, bytes) for x in b):
        raise ValueError(f"{ids}/{blobs}: site ids (int) and bytes expected")
    if len(set(a)) != len(a):
        raise ValueError(f"{ids}: a site is listed twice")
    return list(zip(a, b))


def shares_record(shares: Mapping[int, bytes], *, prefix: str = "share") -> dict[str, Any]:
    """``{site: ciphertext}`` -> ``{prefix-site: [ids], prefix-ct: [bytes]}``."""
    ids = sorted(shares)
    return {f"{prefix}-site": ids, f"{prefix}-ct": [shares[j] for j in ids]}


def read_shares(rec: Mapping[str, Any], *, prefix: str = "share") -> dict[int, bytes]:
    """The inverse of ``shares_record``."""
    return dict(_pairs(rec, f"{prefix}-site", f"{prefix}-ct"))


def reveal_record(got: Mapping[int, tuple[str, bytes]]) -> dict[str, Any]:
    """``{site: (kind, share)}`` -> three parallel lists."""
    ids = sorted(got)
    return {"reveal-site": ids, "reveal-kind": [got[j][0] for j in ids], "reveal-share": [got[j][1] for j in ids]}


def read_reveal(rec: Mapping[str, Any]) -> dict[int, tuple[str, bytes]]:
    """The inverse of ``reveal_record``; a kind other than 'b' or 's' is refused."""
    pairs = _pairs(rec, "reveal-site", "reveal-share")
    kinds = rec.get("reveal-kind")
    if not isinstance(kinds, list) or len(kinds) != len(pairs) or any(k not in KINDS for k in kinds):
        raise ValueError(f"reveal-kind: {len(pairs)} of {KINDS} expected, got {kinds!r:.60}")
    return {j: (str(k), share) for (j, share), k in zip(pairs, kinds)}


def record_bytes(rec: Mapping[str, Any]) -> int:
    """What a stage reply weighs on the wire, for the benchmark: bytes and strings by length,
    numbers at 8 bytes, lists element by element."""
    def size(v: Any) -> int:
        if isinstance(v, bytes):
            return len(v)
        if isinstance(v, str):
            return len(v.encode())
        if isinstance(v, list):
            return sum(size(x) for x in v)
        return 8
    return sum(size(v) for v in rec.values())
