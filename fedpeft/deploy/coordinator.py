"""``fedpeft coordinator``: Flower's ``flower-superlink`` with TLS and SuperNode authentication on,
its state, logs and PID in one folder, sites registered with Flower's CLI, runs launched with
``flwr run``, stopped by its own command (SIGTERM to the PID it recorded, then SIGKILL).

Offline by design: no runtime dependency installation (``--disable-runtime-dependency-installation``,
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``) and no telemetry (``FLWR_TELEMETRY_ENABLED=0``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CONNECTION = "fedpeft"
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
               "HF_HUB_OFFLINE": "1"}


class CoordinatorError(RuntimeError):
    """The SuperLink could not be started, reached or stopped; the message says what and where."""


def _bin(name: str) -> str:
    """A Flower executable next to this interpreter (so the coordinator uses the same install)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


@dataclass
class Coordinator:
    state_dir: Path
    certs_dir: Path | None = None  # ca.crt, server.pem, server.key (``fedpeft certs``); None = insecure
    host: str = "127.0.0.1"
    port: int = 9092

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.certs_dir = Path(self.certs_dir).resolve() if self.certs_dir else None

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "superlink.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    def env(self) -> dict[str, str]:
        return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.flwr_home)}

    def superlink_args(self) -> list[str]:
        args = [_bin("flower-superlink"), "--host", self.host, "--port", str(self.port),
                "--database", str(self.state_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.certs_dir is None:
            return [*args, "--insecure"]
        c = self.certs_dir
        return [*args, "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
                "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]

    def _write_cli_config(self) -> None:
        """The ``flwr`` CLI's connection to this SuperLink, in this coordinator's own FLWR_HOME."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        dial = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{dial}:{self.port}"']
        lines.append(f'root-certificates = "{self.certs_dir / "ca.crt"}"' if self.certs_dir else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def running_pid(self) -> int | None:
        if not self.pid_file.exists():
            return None
        pid = int(self.pid_file.read_text().strip())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return None if _is_zombie(pid) else pid  # dead, not yet reaped by the process that started it

    def start(self, *, timeout: float = 60.0) -> int:
        """Start the SuperLink in the background (its own process group); wait until it listens."""
        if (pid := self.running_pid()) is not None:
            raise CoordinatorError(f"a SuperLink is already running from {self.state_dir} (pid {pid}); "
                                   "`fedpeft coordinator stop` first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_cli_config()
        log = self.log_file.open("ab")
        proc = subprocess.Popen(self.superlink_args(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                cwd=self.state_dir, start_new_session=True)
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CoordinatorError(f"flower-superlink exited with code {proc.returncode}; see {self.log_file}")
            try:
                with socket.create_connection(("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host,
                                               self.port), timeout=1):
                    return proc.pid
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise CoordinatorError(f"flower-superlink did not listen on {self.host}:{self.port} within {timeout:.0f} s; "
                               f"see {self.log_file}")

    def stop(self, *, timeout: float = 20.0) -> bool:
        """Stop the SuperLink this folder started (and its ServerApp children); True if one ran."""
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                    if _is_zombie(pid):
                        break
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                continue
            break
        self.pid_file.unlink(missing_ok=True)
        return True

    def flwr(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Flower's CLI against this SuperLink (its FLWR_HOME, offline env)."""
        self._write_cli_config()
        res = subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise CoordinatorError(f"flwr {' '.join(args)} failed ({res.returncode}): {res.stdout[-2000:]} "
                                   f"{res.stderr[-2000:]}")
        return res

    def register(self, public_key: str | Path) -> str:
        """Allow a site's node-authentication key (``site-<id>/auth.pub`` from ``fedpeft certs``)."""
        return self.flwr("supernode", "register", str(public_key), CONNECTION, timeout=60).stdout

    def run(self, app: str | Path, run_config: str, *, timeout: float | None = None) -> subprocess.CompletedProcess:
        """``flwr run APP`` against this SuperLink, streaming its logs until the run ends."""
        return self.flwr("run", str(app), CONNECTION, "--run-config", run_config, "--stream", timeout=timeout)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
