"""The range stage: a 32-bit ring whose fixed-point step fits the round's deltas, chosen from a sum.

A float32 delta costs 4 bytes a coordinate; a 64-bit ring element costs 8, so a 64-bit secure round
uploads ~2x plaintext. A 2^32 ring matches float32, but with a fixed step it either wraps or loses the
update's precision (Flower's clip range 8 at 2^22 levels: 3.7e-2 relative error on LoRA deltas). The
step must come from the round's own deltas, and no single site's range may reach the coordinator.

So after training each site sends ``[M_i, w_i]``: its largest weighted coordinate ``M_i = max|w_i *
delta_i|`` (rounded up) and its weight, in the 64-bit ring, plus pairwise masks from a third key pair
(``SiteSecrets.range_key``, signed in the advert and never secret-shared). If every participant's
range vector arrives, the masks cancel: the coordinator learns ``B = sum M_i`` and ``W = sum w_i``
(one bound, one total weight; nothing of any one site) and every coordinate of the n-site sum obeys
``|sum_i w_i delta_ij| <= B``. It picks ``F = floor(30 - log2 B)`` fractional bits (``plan_bits``), so
the sum stays below 2^30 in a ring of 2^31, and each site sends its update at that step in 32 bits
(``encode``; two's complement, modular addition is exact; each site's part is at most B too, and a
step that would put it beyond 2^30 is refused). The secure-sum masks are the 64-bit ones reduced
mod 2^32, which stay uniform there. If a range vector is missing, its masks never cancel (its range
key is never revealed), the coordinator learns nothing from the others, and the round falls back to
the 64-bit ring at 32 fractional bits.

The 32-bit round's error: each site rounds to half a step, so the merged mean is within
``n * 2^-(F+1) / W`` of the plaintext one, about ``2^-31`` of ``B / W`` per site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from fedpeft.secagg import ring

WIDE = 64  # the fallback ring: 32 fractional bits (``ring.FRAC_BITS``)
NARROW = 32
TOP = 30  # the sum's magnitude stays below 2^30 of the narrow ring's 2^31: one bit for the sites' rounding
LOW = (1 << NARROW) - 1


@dataclass(frozen=True)
class Bits:
    """A round's ring: its width and the fractional bits of the update's coordinates and of its weight."""

    ring_bits: int
    frac_bits: int
    weight_frac_bits: int

    def __post_init__(self) -> None:
        if self.ring_bits not in (NARROW, WIDE):
            raise ring.RingError(f"ring-bits={self.ring_bits!r}: must be {NARROW} or {WIDE}")
        for name, v in (("frac-bits", self.frac_bits), ("weight-frac-bits", self.weight_frac_bits)):
            if not 0 <= v <= 62:
                raise ring.RingError(f"{name}={v!r}: must be in [0, 62]")

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


FALLBACK = Bits(WIDE, ring.FRAC_BITS, ring.FRAC_BITS)


def range_vector(v: np.ndarray) -> np.ndarray:
    """``[M, w]`` in the 64-bit ring at 32 fractional bits, M rounded up: the site's part of the bound."""
    bound = float(np.abs(v[:-1]).max()) if v.size > 1 else 0.0
    x = ring.encode(np.array([bound, v[-1]], dtype=np.float64))
    x[0] = np.uint64(math.ceil(bound * 2.0**ring.FRAC_BITS))  # up, never down: the bound must hold
    return x


def plan_bits(range_sum: np.ndarray) -> Bits:
    """The round's ring from the unmasked sum of every participant's range vector; the 64-bit ring
    when the sum does not fit 32 bits (a total weight of 2^30 or more, say)."""
    bound, weight = ring.decode(range_sum)
    if not weight > 0 or not bound >= 0:
        return FALLBACK
    frac = 62 if bound == 0 else min(62, math.floor(TOP - math.log2(bound)))
    wfrac = min(62, math.floor(TOP - math.log2(weight)))
    if frac < 0 or wfrac < 0:
        return FALLBACK
    return Bits(NARROW, frac, wfrac)


def encode(v: np.ndarray, bits: Bits) -> np.ndarray:
    """``[w * delta, w]`` (float64) as ring elements (uint64; in the narrow ring only the low 32 bits
    count) at the round's fractional bits. Refuses a part beyond the range the bits were chosen for."""
    if bits == FALLBACK:
        return ring.encode(v)
    if not np.isfinite(v).all():
        raise ring.RingError("update: holds a NaN or an infinity, which no fixed-point ring carries")
    scaled = np.empty_like(v, dtype=np.float64)
    scaled[:-1] = v[:-1] * 2.0**bits.frac_bits
    scaled[-1] = v[-1] * 2.0**bits.weight_frac_bits
    worst = float(np.abs(scaled).max()) if scaled.size else 0.0
    if worst > 2.0**TOP:
        raise ring.RingError(f"update: a coordinate of {worst:.4g} steps is beyond the round's range (2^{TOP} steps "
                             f"at {bits.frac_bits} fractional bits): the range sum it was chosen from left it out")
    return np.rint(scaled).astype(np.int64).view(np.uint64)


def narrow(y: np.ndarray) -> bytes:
    """A masked 64-bit vector as the narrow ring sends it: its low 32 bits, little-endian."""
    return (y & np.uint64(LOW)).astype("<u4").tobytes()


def widen(raw: bytes, size: int, bits: Bits) -> np.ndarray:
    """Received bytes -> uint64 ring elements (narrow: zero-extended; the sum is read mod 2^32)."""
    width = bits.ring_bits // 8
    if len(raw) != size * width:
        raise ValueError(f"masked: {len(raw)} bytes, {size} x {width} expected for a {bits.ring_bits}-bit ring")
    return np.frombuffer(raw, dtype=f"<u{width}").astype(np.uint64)


def decode(total: np.ndarray, bits: Bits) -> np.ndarray:
    """The unmasked sum (uint64) -> float64 ``[sum w * delta, sum w]``."""
    if bits == FALLBACK:
        return ring.decode(total)
    low = (np.asarray(total, dtype=np.uint64) & np.uint64(LOW)).astype(np.uint32).view(np.int32).astype(np.float64)
    low[:-1] /= 2.0**bits.frac_bits
    low[-1] /= 2.0**bits.weight_frac_bits
    return low


def range_total(vectors: Mapping[int, np.ndarray]) -> np.ndarray:
    """The sum of every participant's masked range vector: their masks cancel."""
    total = np.zeros(2, dtype=np.uint64)
    for v in vectors.values():
        total = ring.add(total, v)
    return total


def error_bound(bits: Bits, sites: int, weight: float) -> float:
    """Largest error of a merged coordinate against the plaintext weighted mean (rounding only)."""
    return sites * 0.5 * 2.0**-bits.frac_bits / weight
