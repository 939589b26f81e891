"""Privacy state on disk: a site's accountant history survives a SuperNode restart.

Flower's ``context.state`` lives as long as the SuperNode process; this file outlives it.
Written atomically (temp file + rename), so a crash never leaves a truncated history.
"""

from __future__ import annotations

from pathlib import Path

from fedpeft.io import atomic_write_bytes
from fedpeft.privacy.accountant import PrivacyState


def state_path(state_dir: str | Path, site: int) -> Path:
    return Path(state_dir) / f"privacy-site{site}.json"


def load_state_json(state_dir: str | Path, site: int) -> str | None:
    """The saved JSON, validated by parsing it; None when there is none yet."""
    path = state_path(state_dir, site)
    if not path.exists():
        return None
    text = path.read_text()
    try:
        PrivacyState.from_json(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: privacy state is unreadable ({e}); refusing to restart the accountant") from e
    return text


def save_state_json(state_dir: str | Path, site: int, text: str) -> Path:
    path = state_path(state_dir, site)
    atomic_write_bytes(path, text.encode())
    return path
