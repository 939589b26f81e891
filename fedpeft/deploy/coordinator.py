"""``fedpeft coordinator``: Flower's ``flower-superlink`` with TLS and SuperNode authentication on,
its state, logs and PID in one folder, sites registered with Flower's CLI, runs launched with
``flwr run``, stopped by its own command (SIGTERM to the PID it recorded, then SIGKILL).

The SuperLink listens on loopback only (``internal_port``): its Control API, which starts runs
whose code every site executes, has no user authentication in flwr 1.41. The public
``host:port`` is ``fedpeft.deploy.gateway``, which forwards the Fleet API and nothing else; the
operator's ``flwr`` CLI dials the loopback port from this machine.

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
    port: int = 9092  # the sites dial this: the Fleet-only gateway
    internal_port: int | None = None  # the SuperLink, on 127.0.0.1 only (default port + 1)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.certs_dir = Path(self.certs_dir).resolve() if self.certs_dir else None
        if self.internal_port is None:
            self.internal_port = self.port + 1
        if self.internal_port == self.port:
            raise CoordinatorError(f"internal_port={self.internal_port}: must differ from port={self.port}")

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "superlink.pid"

    @property
    def gateway_pid_file(self) -> Path:
        return self.state_dir / "gateway.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    def env(self) -> dict[str, str]:
        return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.flwr_home)}

    def superlink_args(self) -> list[str]:
        args = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.internal_port),
                "--database", str(self.state_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
        if self.certs_dir is None:
            return [*args, "--insecure"]
        c = self.certs_dir
        return [*args, "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
                "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]

    def gateway_args(self) -> list[str]:
        scheme = "http" if self.certs_dir is None else "https"
        args = [sys.executable, "-m", "fedpeft.deploy.gateway", "--host", self.host, "--port", str(self.port),
                "--upstream", f"{scheme}://127.0.0.1:{self.internal_port}"]
        if self.certs_dir is not None:
            c = self.certs_dir
            args += ["--ca-cert", str(c / "ca.crt"), "--certfile", str(c / "server.pem"),
                     "--keyfile", str(c / "server.key")]
        return args

    def _write_cli_config(self) -> None:
        """The ``flwr`` CLI's connection to this SuperLink, in this coordinator's own FLWR_HOME."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.internal_port}"']
        lines.append(f'root-certificates = "{self.certs_dir / "ca.crt"}"' if self.certs_dir else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def running_pid(self, pid_file: Path | None = None) -> int | None:
        pid_file = pid_file or self.pid_file
        if not pid_file.exists():
            return None
        pid = int(pid_file.read_text().strip())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return None if _is_zombie(pid) else pid  # dead, not yet reaped by the process that started it

    def _spawn(self, args: list[str], pid_file: Path, dial: tuple[str, int], timeout: float) -> int:
        """Start one process in its own group, record its PID, wait until ``dial`` answers."""
        log = self.log_file.open("ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                cwd=self.state_dir, start_new_session=True)
        pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.stop()
                raise CoordinatorError(f"{Path(args[0]).name} exited with code {proc.returncode}; see {self.log_file}")
            try:
                with socket.create_connection(dial, timeout=1):
                    return proc.pid
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise CoordinatorError(f"{' '.join(args[:3])} did not listen on {dial[0]}:{dial[1]} within {timeout:.0f} s; "
                               f"see {self.log_file}")

    def start(self, *, timeout: float = 60.0) -> int:
        """Start the SuperLink on loopback and the Fleet gateway on ``host:port`` (each in its own
        process group); wait until both listen. Returns the SuperLink's PID."""
        for f in (self.pid_file, self.gateway_pid_file):
            if (pid := self.running_pid(f)) is not None:
                raise CoordinatorError(f"a coordinator is already running from {self.state_dir} (pid {pid}); "
                                       "`fedpeft coordinator stop` first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_cli_config()
        assert self.internal_port is not None
        pid = self._spawn(self.superlink_args(), self.pid_file, ("127.0.0.1", self.internal_port), timeout)
        dial = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        self._spawn(self.gateway_args(), self.gateway_pid_file, (dial, self.port), timeout)
        return pid

    def stop(self, *, timeout: float = 20.0) -> bool:
        """Stop the gateway and the SuperLink this folder started (and its ServerApp children);
        True if either ran."""
        ran = False
        for f in (self.gateway_pid_file, self.pid_file):
            ran = self._stop_one(f, timeout) or ran
        return ran

    def _stop_one(self, pid_file: Path, timeout: float) -> bool:
        pid = self.running_pid(pid_file)
        if pid is None:
            pid_file.unlink(missing_ok=True)
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
        pid_file.unlink(missing_ok=True)
        return True

    def flwr(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Flower's CLI against this SuperLink (its FLWR_HOME, offline env)."""
        self._write_cli_config()
        res = subprocess.run([_bin("flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise CoordinatorError(f"flwr {' '.join(args)} failed ({res.returncode}): {res.stdout[-2000:]} "
                                   f"{res.stderr[-2000:]}")
        return res

    def register(self, public_key: str | Path, *, wait: float = 60.0) -> str:
        """Allow a site's node-authentication key (``site-<id>/auth.pub`` from ``fedpeft certs``).
        A SuperLink that listens but whose Control API is not serving yet (seen on a loaded machine
        right after start) answers "unavailable": asked again, with backoff, for up to ``wait`` s."""
        deadline, pause = time.monotonic() + wait, 0.5
        while True:
            res = self.flwr("supernode", "register", str(public_key), CONNECTION, timeout=60, check=False)
            if res.returncode == 0:
                return res.stdout
            if "unavailable" not in (res.stdout + res.stderr) or time.monotonic() + pause > deadline:
                raise CoordinatorError(f"flwr supernode register {public_key} failed ({res.returncode}): "
                                       f"{res.stdout[-2000:]} {res.stderr[-2000:]}")
            time.sleep(pause)
            pause = min(2 * pause, 5.0)

    def run(self, app: str | Path, run_config: str, *, timeout: float | None = None) -> subprocess.CompletedProcess:
        """``flwr run APP`` against this SuperLink, streaming its logs until the run ends."""
        return self.flwr("run", str(app), CONNECTION, "--run-config", run_config, "--stream", timeout=timeout)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
