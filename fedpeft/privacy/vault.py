"""A site's private folder: its Ed25519 signing key, its accountant state and its privacy ledger.

Everything the site must keep across rounds and restarts, and never send: the key stays here
(0600); the privacy state and the ledger are written atomically; the server only gets the
ledger's lines and the public key.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fedpeft.privacy.accountant import PrivacyState
from fedpeft.privacy.ledger import Ledger, delta_hash, load_or_create_key, public_pem
from fedpeft.privacy.store import load_state_json, save_state_json

KEY_FILE = "site-key.pem"
LEDGER_FILE = "ledger.jsonl"
LOCK_FILE = ".lock"


def site_folder(state_dir: str | None, *, out_dir: str, site: int, deployed: bool) -> Path:
    """Node config ``state-dir`` when given; else ``<out-dir>/sites/site-<id>`` in a simulation (the
    researcher plays every site) and ``~/.fedpeft/site-<id>`` on a deployed SuperNode."""
    if state_dir:
        return Path(state_dir)
    return Path.home() / ".fedpeft" / f"site-{site}" if deployed else Path(out_dir) / "sites" / f"site-{site}"


class SiteVault:
    """``folder`` holds one site's key, privacy state and ledger (node config ``state-dir``)."""

    def __init__(self, folder: str | Path, site: int) -> None:
        self.folder = Path(folder)
        self.site = site
        self._ledger: Ledger | None = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[SiteVault]:
        """One writer at a time: a request for this site that overlaps an earlier one still running
        (a late or hung round, a retry, a second run) waits for it, then reads the ledger afresh,
        so two processes never chain entries onto the same head. An OS lock (flock): a killed
        holder releases it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                self._ledger = None  # another process may have appended since this object read it
                yield self
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            key = load_or_create_key(self.folder / KEY_FILE)
            self._ledger = Ledger(self.folder / LEDGER_FILE, key, site=self.site)
        return self._ledger

    def public_key(self) -> str:
        return public_pem(self.ledger.key)

    def ledger_bytes(self) -> bytes:
        return self.ledger.path.read_bytes()

    def privacy_json(self) -> str | None:
        return load_state_json(self.folder, self.site)

    def save_privacy(self, text: str) -> None:
        save_state_json(self.folder, self.site, text)

    def save_release(self, *, server_round: int, global_sha256: str, delta: Mapping[str, torch.Tensor],
                     metrics: Mapping[str, float]) -> None:
        """Keep this round's release: a retried request for the same round and global adapter gets
        the same delta again (re-sending a release costs no privacy; training again would)."""
        from safetensors.torch import save_file

        from fedpeft.io import atomic_dir

        with atomic_dir(self.folder / "last-release") as tmp:
            save_file({k: v.contiguous() for k, v in delta.items()}, str(tmp / "delta.safetensors"))
            (tmp / "release.json").write_text(json.dumps({"round": server_round, "global_sha256": global_sha256,
                                                          "metrics": dict(metrics)}))

    def load_release(self, *, server_round: int, global_sha256: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        from safetensors.torch import load_file

        folder = self.folder / "last-release"
        try:
            meta = json.loads((folder / "release.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("round") != server_round or meta.get("global_sha256") != global_sha256:
            return None
        return load_file(str(folder / "delta.safetensors")), dict(meta["metrics"])

    def begin_round(self, *, server_round: int, global_sha256: str, before: str, seeded: bool) -> None:
        """Note the round in flight and the privacy state before it (write-ahead's starting point)."""
        from fedpeft.io import atomic_write_json

        atomic_write_json(self.folder / "inflight.json", {"round": server_round, "global_sha256": global_sha256,
                                                          "before": before, "seeded": seeded})

    def end_round(self) -> None:
        (self.folder / "inflight.json").unlink(missing_ok=True)

    def signed_steps(self) -> int:
        """DP steps the ledger has signed so far (its last ``dp-sgd`` entry's running total)."""
        signed = 0
        for line in self.ledger.lines():
            entry = json.loads(line)
            if entry.get("kind") == "dp-sgd":
                signed = int(entry.get("steps_total", signed + int(entry.get("steps", 0))))
        return signed

    def rollback_seeded_retry(self, *, server_round: int, global_sha256: str) -> bool:
        """A retry of a round that was cut short, with seeded noise and the same global adapter, will
        draw exactly the same noise for the same steps: those are not new steps, so the state goes
        back to before the round (unless the ledger already signed them). Returns whether it did."""
        path = self.folder / "inflight.json"
        try:
            inflight = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        if not (inflight.get("seeded") and inflight.get("round") == server_round
                and inflight.get("global_sha256") == global_sha256):
            return False
        before = PrivacyState.from_json(inflight["before"])
        if self.signed_steps() != before.steps_taken:
            return False
        self.save_privacy(inflight["before"])
        return True

    def load_canaries(self):
        """The site's audit canaries (labels are secret to the site), or None."""
        from fedpeft.privacy.audit.canaries import TrainingCanaries

        path = self.folder / "canaries.json"
        return TrainingCanaries.from_json(path.read_text()) if path.exists() else None

    def save_canaries(self, canaries) -> None:
        from fedpeft.io import atomic_write_bytes

        atomic_write_bytes(self.folder / "canaries.json", canaries.to_json().encode())

    def record_release(self, *, server_round: int, before: PrivacyState | None, after: PrivacyState,
                       delta: Mapping[str, torch.Tensor], noise: str, deployed: bool,
                       extra: Mapping[str, object] | None = None) -> bytes:
        """One ``dp-sgd`` entry for the steps this round took (the history's new tail); ``extra``:
        more signed fields (a distributed-DP share: ``ddp``)."""
        done = before.steps_taken if before is not None else 0
        steps = after.steps_taken - done
        return self.ledger.append("dp-sgd", {
            "round": server_round, "sigma": after.noise_multiplier, "sample_rate": after.sample_rate,
            "steps": steps, "max_grad_norm": after.max_grad_norm, "delta": after.target_delta,
            "accountant": after.accountant, "noise": noise, "deployed": deployed,
            "epsilon_after": after.epsilon(), "target_epsilon": after.target_epsilon,
            "planned_steps": after.planned_steps, "steps_total": after.steps_taken,
            "adjacency": "add/remove one record of this site",
            "delta_sha256": delta_hash(delta), **dict(extra or {}),
        })

    def reconcile(self, *, noise: str, deployed: bool) -> bytes | None:
        """If the privacy state counts more steps than the ledger (a crash after write-ahead
        accounting, before the release was signed), sign a ``dp-sgd`` entry for those steps, with no
        delta (none left the site). Returns the entry's line, or None when they agree."""
        text = self.privacy_json()
        if text is None:
            return None
        state = PrivacyState.from_json(text)
        missing = state.steps_taken - self.signed_steps()
        if missing <= 0:
            return None
        return self.ledger.append("dp-sgd", {
            "round": state.round, "sigma": state.noise_multiplier, "sample_rate": state.sample_rate,
            "steps": missing, "max_grad_norm": state.max_grad_norm, "delta": state.target_delta,
            "accountant": state.accountant, "noise": noise, "deployed": deployed,
            "epsilon_after": state.epsilon(), "target_epsilon": state.target_epsilon,
            "planned_steps": state.planned_steps, "steps_total": state.steps_taken,
            "adjacency": "add/remove one record of this site", "delta_sha256": None, "recovered": True,
        })

    def record_release_without_dp(self, *, server_round: int, delta: Mapping[str, torch.Tensor],
                                  extra: Mapping[str, object] | None = None) -> bytes:
        """A release this site made with DP off by its own policy: signed, so no audit mistakes it."""
        return self.ledger.append("no-dp", {
            "round": server_round, "deployed": True, "delta_sha256": delta_hash(delta),
            "adjacency": "none: no differential privacy (the site's own policy, dp = false)", **dict(extra or {}),
        })

    def record_decline(self, *, server_round: int, state: PrivacyState, reason: str) -> bytes:
        return self.ledger.append("declined", {
            "round": server_round, "epsilon_after": state.epsilon(), "target_epsilon": state.target_epsilon,
            "delta": state.target_delta, "steps_total": state.steps_taken, "reason": reason,
        })
