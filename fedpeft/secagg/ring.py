"""Fixed-point vectors in the ring Z_(2^64), and the masks that hide them.

A site's (weighted, clipped) update becomes integers ``round(x * 2^F)`` in two's complement, so
masked sums wrap in numpy's uint64 arithmetic and the sum of the sites' values reads back as a
signed integer. With F=32 fractional bits the step is 2.3e-10 (relative error ~1e-9 on LoRA deltas
of 1e-4 weighted by hundreds of notes) and the sum must stay below 2^31 in absolute value:
``check_headroom`` refuses a configuration that could overflow. Flower's quantiser (clip range 8,
2^22 levels, 32-bit ring) loses 3.7e-2 relative on such deltas, hence a ring of our own.

Masks come from ChaCha20 keyed by a full 32-byte seed (Flower folds its seed into 32 bits of
MT19937 state).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

FRAC_BITS = 32
RING_BITS = 64


class RingError(ValueError):
    """A value or configuration the ring cannot carry without wrapping; the message names it."""


def encode(x: np.ndarray, *, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """float vector -> uint64 ring elements (round to nearest; two's complement for negatives)."""
    v = np.asarray(x, dtype=np.float64)
    if not np.isfinite(v).all():
        raise RingError("update: holds a NaN or an infinity, which no fixed-point ring carries")
    limit = 2.0 ** (RING_BITS - 1 - frac_bits)
    worst = float(np.abs(v).max()) if v.size else 0.0
    if worst >= limit:
        raise RingError(f"update: a coordinate of {worst:.4g} is beyond the ring's range (+-{limit:.4g} at "
                        f"{frac_bits} fractional bits)")
    return np.rint(v * 2.0**frac_bits).astype(np.int64).view(np.uint64)


def decode(y: np.ndarray, *, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """uint64 ring elements (a sum of encoded vectors) -> float64, read as signed integers."""
    return np.asarray(y, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits


def check_headroom(*, max_abs: float, sites: int, frac_bits: int = FRAC_BITS) -> None:
    """Refuse a round whose sum could wrap: ``sites`` values each at most ``max_abs``."""
    total = max_abs * sites
    limit = 2.0 ** (RING_BITS - 1 - frac_bits)
    if not total < limit:
        raise RingError(f"secagg: {sites} sites x a coordinate bound of {max_abs:.4g} = {total:.4g} could "
                        f"overflow the ring (+-{limit:.4g} at {frac_bits} fractional bits); clip harder or "
                        "use fewer fractional bits")


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` uniform uint64 values from ChaCha20 keyed by a 32-byte ``seed`` (zero nonce: every seed
    is used for one vector only, derived per round and per pair)."""
    if len(seed) != 32:
        raise RingError(f"seed: must be 32 bytes, got {len(seed)}")
    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * n)), dtype="<u8").astype(np.uint64)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a + b in Z_(2^64) (uint64 wraps)."""
    return np.add(a, b, dtype=np.uint64)


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a - b in Z_(2^64)."""
    return np.subtract(a, b, dtype=np.uint64)
