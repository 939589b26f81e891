"""Compressed deltas on the wire: ``delta-format = float32 | float16 | int8``.

Pure functions. ``encode`` turns a site's delta into the tensors it sends: float16 casts; int8 keeps
one float32 scale per channel, max |channel| / 127, and rounds to nearest. The channels run along
a matrix's shorter side (LoRA's A: its r rows; B: its r columns), so the scales cost r floats
rather than d (NVFlare's blockwise 8-bit is the same idea with fixed blocks). ``decode`` is the
server's inverse.
Quantising after the DP noise is post-processing: epsilon is unchanged (docs/privacy.md).

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): a site keeps what quantisation cut off
(``residual``) and adds it to its next delta before encoding, so the error does not accumulate over
rounds; the residual lives in the site's saved state so a resumed run stays exact.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

FORMATS = ("float32", "float16", "int8")
SCALE = "::scale"  # suffix of an int8 tensor's per-row scales on the wire


class CompressionError(ValueError):
    """A wire dict that does not decode (a missing or misshapen scale, a wrong dtype)."""


def _channels(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(a (channels, values) view, whether it is transposed): a vector is one channel; a matrix (dims
    after the first flattened) has one channel per row or per column, whichever side is shorter."""
    m = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    return (m, False) if m.shape[0] <= m.shape[1] else (m.T, True)


def _unchannel(c: torch.Tensor, transposed: bool, shape: torch.Size) -> torch.Tensor:
    return (c.T if transposed else c).reshape(shape)


def encode(delta: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The tensors a site sends for ``delta`` in ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"delta-format={fmt!r}: must be one of {', '.join(FORMATS)}")
    if fmt == "float32":
        return {k: v.to(torch.float32) for k, v in delta.items()}
    if fmt == "float16":
        return {k: v.to(torch.float16) for k, v in delta.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in delta.items():
        ch, tr = _channels(v.to(torch.float32))
        scale = ch.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(ch / safe.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        out[k] = _unchannel(q, tr, v.shape).contiguous()
        out[k + SCALE] = scale
    return out


def decode(wire: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """float32 tensors from what a site sent in ``fmt``; raises ``CompressionError`` naming the key."""
    if fmt != "int8":
        want = torch.float16 if fmt == "float16" else torch.float32
        for k, v in wire.items():
            if v.dtype != want:
                raise CompressionError(f"{k}: dtype {v.dtype}, but delta-format={fmt!r} sends {want}")
        return {k: v.to(torch.float32) for k, v in wire.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in wire.items():
        if k.endswith(SCALE):
            if k[: -len(SCALE)] not in wire:
                raise CompressionError(f"{k}: a scale without its tensor")
            continue
        scale = wire.get(k + SCALE)
        if scale is None:
            raise CompressionError(f"{k}: no {k + SCALE} (delta-format='int8' sends one scale per row)")
        if v.dtype != torch.int8 or scale.dtype != torch.float32:
            raise CompressionError(f"{k}: dtypes {v.dtype}/{scale.dtype}, expected torch.int8/torch.float32")
        ch, tr = _channels(v)
        if tuple(scale.shape) != (ch.shape[0],):
            raise CompressionError(f"{k + SCALE}: shape {tuple(scale.shape)}, expected ({ch.shape[0]},)")
        if not torch.isfinite(scale).all() or (scale < 0).any():
            raise CompressionError(f"{k + SCALE}: scales must be finite and >= 0")
        out[k] = _unchannel(ch.to(torch.float32) * scale.unsqueeze(1), tr, v.shape)
    return out


def with_feedback(delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
                  fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(wire tensors, new residual): the delta plus the last residual, encoded; what was cut off is kept."""
    full = {k: v.to(torch.float32) + (residual[k].to(torch.float32) if residual and k in residual else 0.0)
            for k, v in delta.items()}
    wire = encode(full, fmt)
    sent = decode(wire, fmt)
    return wire, {k: full[k] - sent[k] for k in full}


def wire_bytes(wire: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in wire.values())


_RESIDUAL = re.compile(r"residual-r(\d+)\.safetensors")


def site_encode(delta: Mapping[str, torch.Tensor], *, fmt: str, feedback: bool, folder: Path | None,
                server_round: int) -> dict[str, torch.Tensor]:
    """What a site sends for its round-``server_round`` delta. With ``feedback`` the residual of the
    latest earlier round (a file in the site's folder) is added first, and this round's residual is
    written (temp file, then rename); a redone round reads the same earlier residual, so a resumed
    run sends bitwise what an uninterrupted one does."""
    if not feedback:
        return encode(delta, fmt)
    from safetensors.torch import load_file, save

    from fedpeft.io import atomic_write_bytes

    if folder is None:
        raise ValueError("error-feedback=true needs the site's state folder for its residual")
    folder.mkdir(parents=True, exist_ok=True)
    earlier = sorted((int(m.group(1)), p) for p in folder.glob("residual-r*.safetensors")
                     if (m := _RESIDUAL.fullmatch(p.name)) and int(m.group(1)) < server_round)
    residual = load_file(str(earlier[-1][1])) if earlier else None
    wire, new = with_feedback(delta, residual, fmt)
    atomic_write_bytes(folder / f"residual-r{server_round:06d}.safetensors",
                       save({k: v.contiguous() for k, v in new.items()}))
    for _, p in earlier[:-1]:  # keep the one a redo of this round needs
        p.unlink()
    return wire
