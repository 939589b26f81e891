"""A site's answer to a train (or evaluate) request: one type, as the site builds it
(``fedpeft.site``) and as the server gets it back after validation (``fedpeft.federation``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Reply:
    status: str  # "trained", "declined" (its budget would be exceeded) or "evaluated" (a ledger only)
    delta: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)  # carries "site" and "num-examples"
    reason: str = ""
    ledger: bytes | None = None  # the site's signed privacy ledger, whole
    public_key: str | None = None
    sent_sha256: str | None = None  # the server's hash of the tensors as sent (before delta-format decoding)

    @property
    def site(self) -> int:
        return int(self.metrics["site"])

    @property
    def num_examples(self) -> int:
        return int(self.metrics.get("num-examples", 0))
