"""The deploy guide's commands, run for real on 127.0.0.1 (docs/deploy.md, "one machine"): certs,
a TLS + node-authenticated coordinator, two registered sites, a 2-round run, the audit, stop.
Its wall time (`flwr run` start to end) against the same run — same site files, same config — in
Flower's Simulation Engine (`fedpeft simulate`).

Last line: deploy_vs_sim_time_ratio=<x>
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpeft.data.notes import LABELS, generate_notes

ROOT = Path(__file__).resolve().parents[2]
RUN = ("model='minilm' model-layers=1 lora-layers='0' num-sites=2 num-server-rounds=2 local-epochs=2 "
       "batch-size=64 global-test-size=200 min-train-sites=2 text-column='note' label-column='diagnosis' "
       "labels='{labels}' data='{dir}/site{{site}}.csv'")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*args: str, cwd: Path) -> str:
    """One guide command; its output echoed, a failure fatal."""
    print("$ fedpeft " + " ".join(args), flush=True)
    res = subprocess.run([sys.executable, "-m", "fedpeft.cli", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def write_sites(d: Path, port: int, app_hash: str, secure: bool = False) -> None:
    for s in range(2):
        texts, ys = generate_notes(n=300, seed=40 + s)
        with (d / f"site{s}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["note", "diagnosis"])
            w.writerows([t, LABELS[y]] for t, y in zip(texts, ys))
        (d / f"site{s}.toml").write_text(
            f'[site]\nid = {s}\nstate-dir = "state-site{s}"\napi-port = {_port()}\n\n'
            f'[coordinator]\naddress = "127.0.0.1:{port}"\nca-cert = "certs/ca.crt"\nauth-key = "certs/site-{s}/auth"\n\n'
            f'[data]\npath = "site{s}.csv"\ntext-column = "note"\nlabel-column = "diagnosis"\n'
            f'labels = {json.dumps(list(LABELS))}\n\n[privacy]\ntarget-epsilon = 8.0\ntarget-delta = 1e-5\n\n'
            f'[app]\ntrusted = ["{app_hash}"]\n' + ('\n[secagg]\nroster = "roster.json"\n' if secure else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--secure", action="store_true", help="with secure aggregation (a roster of the sites' keys)")
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="fedpeft-deploy-"))
    port = _port()
    write_sites(d, port, sh("app-hash", str(ROOT), cwd=d).strip(), secure=args.secure)
    run_cfg = RUN.format(labels=",".join(LABELS), dir=d) + (" secure-aggregation=true" if args.secure else "")
    sites: list[subprocess.Popen] = []
    try:
        sh("certs", "--out", "certs", "--san", "127.0.0.1", "--san", "localhost", "--sites", "2", cwd=d)
        sh("coordinator", "start", "--certs", "certs", "--host", "127.0.0.1", "--port", str(port), cwd=d)
        sh("coordinator", "register", "certs/site-0/auth.pub", "certs/site-1/auth.pub", "--port", str(port), cwd=d)
        (d / "site-keys").mkdir()
        for s in range(2):  # the officer collects each site's key (and its fingerprint) out of band
            print(sh("site", f"site{s}.toml", "--fingerprint", cwd=d).strip())
            (d / "site-keys" / f"site-{s}.pub").write_bytes((d / f"state-site{s}" / f"site-{s}.pub").read_bytes())
        if args.secure:  # the federation's roster, given to every site (the same keys the auditor holds)
            print(sh("roster", "site-keys", "--out", "roster.json", cwd=d).strip())
        for s in range(2):
            print(f"$ fedpeft site site{s}.toml   # (in the background: one terminal per site)", flush=True)
            sites.append(subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "site", f"site{s}.toml"], cwd=d,
                                          stdout=(d / f"site{s}.log").open("wb"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
        t = time.perf_counter()
        sh("coordinator", "run", "--port", str(port), "--run-config", f"{run_cfg} out-dir='{d}/run'",
           "--timeout", "900", cwd=d)
        deploy_s = time.perf_counter() - t
        print(sh("audit", f"{d}/run", "--keys", "site-keys", cwd=d).splitlines()[-1])
        if args.secure:
            kept = sorted(p.name for p in (d / "run" / "secagg").glob("round-*"))
            print(f"secure rounds kept: {kept}")
    finally:
        for p in sites:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        sh("coordinator", "stop", "--port", str(port), cwd=d)
    t = time.perf_counter()
    sh("simulate", "--preset", "smoke", "--run-config", run_cfg, "--out", f"{d}/sim", cwd=d)
    sim_s = time.perf_counter() - t
    acc = {k: json.loads((d / k / "metrics.json").read_text())["rounds"][-1]["global"]["accuracy"]
           for k in ("run", "sim")}
    print(f"2 sites x 2 rounds: deployed over TLS {deploy_s:.1f} s (accuracy {acc['run']:.3f}), "
          f"Simulation Engine {sim_s:.1f} s (accuracy {acc['sim']:.3f}); folder {d}")
    if not args.keep:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
    print(f"deploy_vs_sim_time_ratio={deploy_s / sim_s:.3f}")


if __name__ == "__main__":
    main()
