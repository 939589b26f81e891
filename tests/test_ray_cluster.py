"""`fedpeft simulate --ray-address` on a real two-node Ray cluster on the loopback interface (a
head and one worker node, each with one CPU, started here and stopped after): the same seeded
results as the same federation run in this process (``fedpeft.inprocess``: the site code and the
merge without Flower or Ray), which the other end-to-end files use as their plaintext reference."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

OVERRIDES = ("dp-noise='seeded' num-server-rounds=1 notes-per-site=120 test-per-site=10 global-test-size=60 "
             "local-epochs=1")
RUN = ["--preset", "smoke", "--run-config", OVERRIDES]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, env: dict[str, str]) -> str:
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    out = subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _cluster_pids(temp_dir: str) -> list[int]:
    """This cluster's processes: their command line names its temp dir, or (Ray's agents rename
    themselves) they hold a log file open in it."""
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mine = temp_dir in cmd or any(os.readlink(fd).startswith(temp_dir) for fd in (pid_dir / "fd").iterdir())
        except OSError:
            continue
        if mine:
            pids.append(int(pid_dir.name))
    return pids


def _stop(temp_dir: str) -> None:
    """Only this cluster's processes: `ray stop` would also stop the Ray of a simulation that another
    test worker is running. Waits until they are gone."""
    deadline = time.monotonic() + 30
    while (pids := _cluster_pids(temp_dir)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)


def test_a_simulation_on_a_two_node_ray_cluster_gives_the_local_results(tmp_path):
    # Prepare: a head and a worker node on 127.0.0.1 (short temp dir: Ray's socket paths are limited)
    temp_dir = tempfile.mkdtemp(prefix="fp-ray-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    cli = [sys.executable, "-m", "fedpeft.cli", "simulate", *RUN]
    try:
        _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
             "--include-dashboard=false", f"--temp-dir={temp_dir}", "--disable-usage-stats", env=env)
        _ray("start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--disable-usage-stats", env=env)
        probe = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()), int(ray.cluster_resources()['CPU']))")
        alive = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        # two live nodes of one CPU each: Flower's actor pool (client-cpus=1) puts one site on each
        assert alive.stdout.split()[-2:] == ["2", "2"], alive.stdout + alive.stderr
        # Execute: the same seeded run on the cluster and locally
        subprocess.run([*cli, "--ray-address", address, "--out", str(tmp_path / "cluster")], env=env, check=True,
                       timeout=400, capture_output=True)
    finally:
        _stop(temp_dir)
    assert not _cluster_pids(temp_dir), "the cluster's processes outlived the test"
    shutil.rmtree(temp_dir, ignore_errors=True)
    # the reference: the same federation in this process, sites in turn
    from fedpeft.cli import simulation_config
    from fedpeft.inprocess import run_federation
    from fedpeft.runconfig import from_run_config

    ref, local = run_federation(from_run_config(simulation_config("smoke", [OVERRIDES], str(tmp_path / "local"))))
    # Assert: same adapter and global accuracy; every site trained on the cluster
    cluster = json.loads((tmp_path / "cluster" / "metrics.json").read_text())
    assert sorted(cluster["rounds"][-1]["merged"], key=int) == ["0", "1", "2"]
    assert [r["global"]["accuracy"] for r in cluster["rounds"]] == pytest.approx([r.accuracy for r in local], rel=1e-4)
    from safetensors.torch import load_file

    mine = load_file(str(tmp_path / "cluster" / "adapter" / "adapter_model.safetensors"))
    assert set(mine) == set(ref)
    for k in ref:  # bit for bit in every run so far; float32 rounding is the contract (see the resume test)
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-6, atol=1e-6 * float(ref[k].abs().max()))
