"""A site runs only the Flower app it pinned: the SHA-256 of the app's FAB, in its own file.

A run's ClientApp is code that every connected SuperNode executes, so the coordinator must not be
able to ship other code to the hospitals. Flower's own answer (``--trusted-entities``) verifies
only apps signed through Flower's hosted registry, which a locally built app never is; so the
check is made here, with Flower's parts:

- ``app_hash(DIR)`` builds the app's FAB exactly as ``flwr run DIR`` does (Flower's builder fixes
  every timestamp, so the same files give the same bytes) and hashes it, as Flower hashes a FAB.
- ``fedpeft site`` puts a ``flwr-clientapp`` launcher first on the SuperNode's PATH (Flower's
  SuperExec starts ClientApp processes by that name) whose process verifies the SHA-256 of the
  FAB's *content* before Flower installs or imports any of it; any other app raises, and the
  coordinator gets the refusal as the ClientApp's error reply.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path

TRUSTED_ENV = "FEDPEFT_TRUSTED_APPS"
LAUNCHER = "flwr-clientapp"


class UntrustedApp(RuntimeError):
    """The run's app is not one this site pinned; nothing of it was installed or run."""


def app_hash(app_dir: str | Path) -> str:
    """The SHA-256 Flower gives the FAB that ``flwr run APP_DIR`` would submit."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def write_launcher(folder: str | Path) -> Path:
    """``FOLDER/bin/flwr-clientapp``: this interpreter's verifying ClientApp launcher; put
    ``FOLDER/bin`` first on the SuperNode's PATH. Returns the bin folder."""
    bin_dir = Path(folder) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / LAUNCHER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fedpeft.deploy.apptrust "$@"\n')
    tmp.chmod(stat.S_IRWXU)
    tmp.replace(path)
    return bin_dir


def launcher_env(folder: str | Path, trusted: list[str], env: dict[str, str]) -> dict[str, str]:
    """The SuperNode's environment: the launcher first on PATH, the pinned hashes beside it."""
    bin_dir = write_launcher(folder)
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", TRUSTED_ENV: ",".join(trusted)}


def verify(content: bytes, trusted: list[str]) -> str:
    """The FAB's SHA-256 if it is pinned, else UntrustedApp (fails closed: no pins, no app)."""
    digest = hashlib.sha256(content).hexdigest()
    if digest not in trusted:
        raise UntrustedApp(f"app sha256={digest}: not one this site trusts (its file's app.trusted: "
                           f"{', '.join(trusted) or 'none'}); refused before any of it was installed or run")
    return digest


def main() -> None:
    """``flwr-clientapp``, with the FAB's hash checked before Flower installs it."""
    import flwr.supernode.runtime.run_clientapp as runner
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    trusted = [h for h in os.environ.get(TRUSTED_ENV, "").split(",") if h]
    install = runner.install_from_fab

    def verified_install(fab_file: bytes | Path, *args: object, **kwargs: object) -> Path:
        verify(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes(), trusted)
        return install(fab_file, *args, **kwargs)  # type: ignore[arg-type]

    # Flower's runner looks its installer up by name: the one seam before any app code runs.
    runner.install_from_fab = verified_install
    flwr_clientapp()


if __name__ == "__main__":
    main()
