"""``fedpeft`` command line. ``fedpeft simulate`` runs the Flower apps in Flower's Simulation Engine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from fedpeft import __version__

if TYPE_CHECKING:
    from fedpeft.config import RunConfig

log = logging.getLogger("fedpeft")
PRESET_DIR = Path(__file__).resolve().parents[1] / "simulations"


def load_preset(name: str) -> dict[str, Any]:
    """A preset is a flat run-config TOML: a path, or a name under ``simulations/``."""
    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        raise ValueError(f"--preset={name!r}: no such preset ({path}); known: {', '.join(preset_names())}")
    flat = tomllib.loads(path.read_text())
    flat.setdefault("preset", path.stem)
    return flat


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml")) if PRESET_DIR.exists() else []


def parse_run_config(overrides: list[str]) -> dict[str, Any]:
    """Flower's ``--run-config`` syntax (TOML values), with one line naming the token that is not
    valid TOML instead of a parser traceback (an unquoted string is the usual one)."""
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args(overrides))
    except BaseException:  # flwr raises click/typer exits or tomli errors, depending on the token
        for token in " ".join(overrides).split():
            key, sep, value = token.partition("=")
            try:
                parse_config_args([token])
            except BaseException:
                hint = f" (strings need quotes: {key}='{value}')" if sep and value and value[0] not in "'\"" else ""
                raise ValueError(f"--run-config {token!r}: {key or token} is not key=<TOML value>{hint}") from None
        raise ValueError(f"--run-config {' '.join(overrides)!r}: not Flower's key=value syntax") from None


def simulation_config(preset: str, overrides: list[str] | None, out: str | None) -> dict[str, Any]:
    """Preset, then ``--run-config`` overrides (Flower's syntax), then ``--out``; validated."""
    from fedpeft.runconfig import from_run_config, to_run_config

    flat = load_preset(preset)
    flat.update(parse_run_config(overrides) if overrides else {})
    if out:
        flat["out-dir"] = out
    return to_run_config(from_run_config(flat))


def _backend(cfg: RunConfig, cuda: bool, ray_address: str | None = None) -> tuple[dict[str, Any], int]:
    """Ray resources per virtual site (client-cpus, client-gpus), and how many sites run at once on
    this machine. By default every site gets an equal fraction of this machine's GPU (Ray fractional
    GPUs), so a GPU machine needs no flags. ``ray_address``: join a running Ray cluster (``ray start``)
    instead of starting a local one; the cluster's scheduler places the sites."""
    workers = max(1, int((os.cpu_count() or 1) / cfg.federation.client_cpus))
    gpus = cfg.federation.client_gpus if cfg.federation.client_gpus >= 0 else (1.0 / workers if cuda else 0.0)
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                            "logging_level": "INFO" if os.environ.get("FEDPEFT_VERBOSE") else "ERROR"}
    if ray_address:
        init["address"] = ray_address
    return {"client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": gpus}, "init_args": init}, workers


RUN_PARTS = ("sites", "ledger", "audit", "checkpoints", "server-state.json", "metrics.json", "adapter")


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """An earlier run's folder holds evidence (ledgers, keys, spent budgets): never replace it
    silently. Refuse unless ``overwrite`` (then say what goes) or the run resumes (elsewhere)."""
    found = [p for p in RUN_PARTS if (out / p).exists()]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"--out={str(out)!r}: holds an earlier run ({', '.join(found)}); its ledgers are "
                         "evidence. Choose another --out, continue it with --resume, or pass --overwrite")
    for p in found:
        log.warning("--overwrite: removing %s of an earlier run", out / p)
        (out / p).unlink() if (out / p).is_file() else shutil.rmtree(out / p)


def simulate(flat: dict[str, Any], *, overwrite: bool = False, ray_address: str | None = None) -> dict[str, Any]:
    """Run ServerApp + ClientApp in Flower's Simulation Engine (Ray); always shut Ray down (or, on
    a cluster given by ``ray_address`` or ``RAY_ADDRESS``, disconnect from it).

    The engine runs in a daemon thread (so do the threads Flower starts from it) while this one
    waits: Ctrl-C then stops the run within seconds, shutting Ray down; the rounds already
    completed keep their checkpoints and ``metrics.json`` (written atomically every round).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import torch
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation  # the Python entry with a server context
    from flwr.supercore.telemetry import EventType

    from clients.client_app import app as client_app
    from fedpeft.prefix import CACHE_DIR_ENV, WORKERS_ENV
    from fedpeft.privacy.accountant import SIGMA_CACHE_ENV
    from fedpeft.runconfig import from_run_config
    from fedpeft.runtime import quiet_libraries
    from fedpeft.simengine import fast_message_pump
    from server.server_app import app as server_app

    quiet_libraries()
    cfg = from_run_config(flat)
    # A simulation plays every party and starts from nothing: an earlier run's site folders (keys,
    # spent budgets), ledger copies and audit in the same out-dir would be mistaken for this run's.
    if not cfg.federation.resume:  # a resumed run continues from exactly these
        check_out_dir(Path(cfg.federation.out_dir), overwrite=overwrite)
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if ray_address:
        log.info("joining the Ray cluster at %s", ray_address)
    backend, workers = _backend(cfg, torch.cuda.is_available(), ray_address)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(flat))
    # One frozen-prefix cache folder for every Ray worker of this run (fedpeft.prefix), removed after;
    # each worker sizes its in-memory caches to its share of the machine.
    cache_dir = tempfile.mkdtemp(prefix="fedpeft-prefix-")
    saved = {k: os.environ.get(k) for k in (CACHE_DIR_ENV, WORKERS_ENV, SIGMA_CACHE_ENV)}
    os.environ[CACHE_DIR_ENV] = cache_dir
    os.environ[SIGMA_CACHE_ENV] = cache_dir  # sigma calibrations shared by the workers (fedpeft.privacy.accountant)
    os.environ[WORKERS_ENV] = str(workers)
    failure: list[BaseException] = []

    def engine() -> None:
        try:
            with fast_message_pump():  # Flower's pump sweeps every node every 0.1 s (fedpeft.simengine)
                _run_simulation(
                    num_supernodes=cfg.federation.num_sites, client_app=client_app, server_app=server_app,
                    backend_config=backend, server_app_context=context,
                    exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                )
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)

    thread = threading.Thread(target=engine, name="fedpeft-simulation", daemon=True)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        log.warning("interrupted: stopping Ray; completed rounds are in %s", cfg.federation.out_dir)
        raise
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(cache_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if failure:
        raise failure[0]
    return json.loads((Path(cfg.federation.out_dir) / "metrics.json").read_text())


def resume_config(run_dir: str) -> dict[str, Any]:
    """The interrupted run's own config (from its metrics.json), told to resume in place."""
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        raise ValueError(f"--resume {run_dir!r}: no metrics.json there; nothing to resume")
    flat = dict(json.loads(path.read_text())["config"])
    flat.update({"resume": True, "out-dir": str(run_dir)})
    return flat


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a service manager, `kill`, a CI timeout) stops a simulation as Ctrl-C does: Ray shut
    down, the completed rounds intact."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _cmd_simulate(args: argparse.Namespace) -> int:
    _sigterm_as_interrupt()
    if args.resume:
        flat = resume_config(args.resume)
        if args.run_config:
            raise ValueError("--resume continues the run as it was configured; drop --run-config")
        metrics = simulate(flat, ray_address=args.ray_address)
        print(f"done: resumed after round {metrics.get('resumed_after')}, "
              f"{len(metrics['rounds']) - 1} rounds, final global accuracy "
              f"{metrics['rounds'][-1]['global']['accuracy']:.4f}")
        return 0
    flat = simulation_config(args.preset, args.run_config, args.out)
    metrics = simulate(flat, overwrite=args.overwrite, ray_address=args.ray_address)
    last = metrics["rounds"][-1]
    out = Path(flat["out-dir"])
    print(f"done: {len(metrics['rounds']) - 1} rounds, final global accuracy {last['global']['accuracy']:.4f}, "
          f"{metrics['wall_s']:.0f} s")
    print(f"results: {out / 'metrics.json'}  adapter: {out / 'adapter'}  plots: {out / 'plots'}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from fedpeft.privacy.audit.checks import audit_run, empirical_audit
    from fedpeft.privacy.audit.provenance import add_provenance
    from fedpeft.privacy.audit.report import write_report
    from fedpeft.privacy.audit.statement import known, privacy_statement

    run = Path(args.run_dir)
    if not run.is_dir():
        raise ValueError(f"DIR={str(run)!r}: no such run folder")
    res = audit_run(run, keys_dir=args.keys, tolerance=args.tolerance)
    if args.empirical:
        empirical_audit(res, canaries=args.canaries)
    add_provenance(res)
    out = write_report(res, run / "audit")
    from fedpeft.modelcard import record_audit

    record_audit(run / "adapter", res.verdict, f"{len(res.failures)} failure(s); trust root: {res.trust_root}. "
                                               f"Report: {out / 'report.md'}")
    for f in res.failures:
        print(f"FAIL {f}")
    for w in res.warnings:
        print(f"warn {w}")
    print(f"trust root: {res.trust_root}")
    for s, a in sorted(res.sites.items()):
        print(f"site {s}: key {a.fingerprint or 'unknown'}; {a.releases} releases, {a.steps} steps, claimed eps "
              f"{known(a.claimed_epsilon, '.4f')}, recomputed {known(a.epsilon_recomputed, '.4f')} ({a.recomputed_with}; "
              f"RDP {known(a.epsilon_rdp, '.4f')}, PLD {known(a.epsilon_pld, '.4f')}), budget {known(a.target_epsilon, 'g')}")
    if res.empirical:
        print(f"empirical: {res.empirical['summary']}")
    print(privacy_statement(res))
    note = {"PASS": "", "FAIL": "",
            "QUALIFIED PASS": " (qualified: trusts the coordinator's copies of the sites' keys; compare the "
                              "fingerprints with the sites', then rerun with --keys)"}[res.verdict]
    print(f"{res.verdict}{note}: report {out / 'report.md'} (also .html, .json, epsilon.png)")
    return 0 if res.ok else 1


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedpeft.deploy.certs import make_certs

    paths = make_certs(args.out, sans=args.san, sites=args.sites, force=args.force)
    print(f"CA {paths.ca_cert}; coordinator certificate {paths.server_cert} (SANs: {', '.join(args.san)})")
    for s, (priv, pub) in paths.site_keys.items():
        print(f"site {s}: node key {priv} (keep at the site, 0600), public key {pub} (register at the coordinator)")
    return 0


def _coordinator(args: argparse.Namespace):
    from fedpeft.deploy.coordinator import Coordinator

    return Coordinator(Path(args.state_dir), None if args.insecure else Path(args.certs), host=args.host, port=args.port,
                       internal_port=args.internal_port)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from fedpeft.deploy.coordinator import CoordinatorError

    coord = _coordinator(args)
    try:
        if args.action == "start":
            pid = coord.start()
            print(f"SuperLink running (pid {pid}) on 127.0.0.1:{coord.internal_port} (operator only); sites dial "
                  f"the Fleet-only gateway on {args.host}:{args.port}; state and log in {coord.state_dir}")
        elif args.action == "stop":
            print("stopped" if coord.stop() else f"no SuperLink running from {coord.state_dir}")
        elif args.action == "register":
            if not args.keys:
                raise ValueError("coordinator register: give the sites' auth.pub files "
                                 "(e.g. `fedpeft coordinator register certs/site-0/auth.pub`)")
            for key in args.keys:
                if not Path(key).is_file():
                    raise ValueError(f"KEY={key!r}: no such public key file")
                print(coord.register(key).strip())
        elif args.action == "run":
            rc = args.run_config or ""
            if rc and rc.endswith(".toml") and Path(rc).is_file():  # flwr resolves a file against the app
                rc = str(Path(rc).resolve())
            from fedpeft.deploy.apptrust import app_hash

            print(f"app {args.app}: sha256 {app_hash(args.app)} (sites run it only if their [app] trusted "
                  "lists it)", flush=True)
            res = coord.run(args.app, rc, timeout=args.timeout)
            print(res.stdout[-4000:])
    except CoordinatorError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 1
    return 0


def _site_key(cfg) -> tuple[str, Path]:
    """This site's ledger key fingerprint (the key is made on first use) and its public key file."""
    from fedpeft.privacy.ledger import fingerprint
    from fedpeft.privacy.vault import SiteVault

    pem = SiteVault(cfg.state_dir, cfg.site_id).public_key()
    pub = cfg.state_dir / f"site-{cfg.site_id}.pub"
    if not pub.exists() or pub.read_text() != pem:
        from fedpeft.io import atomic_write_bytes

        atomic_write_bytes(pub, pem.encode())
    return fingerprint(pem), pub


def _cmd_site(args: argparse.Namespace) -> int:
    from fedpeft.deploy.apptrust import launcher_env
    from fedpeft.deploy.coordinator import OFFLINE_ENV
    from fedpeft.deploy.site_config import load_site_config
    from fedpeft.policy import SitePolicy

    cfg = load_site_config(args.config, insecure=args.insecure)
    fp, pub = _site_key(cfg)
    if args.fingerprint:
        print(f"site {cfg.site_id} ledger key {fp}  (public key {pub})")
        return 0
    argv = cfg.supernode_args()
    what = "labelled notes" if cfg.task == "classification" else "instruction examples"
    print(f"site {cfg.site_id}: {cfg.examples} {what} in {cfg.data_path}; connecting to {cfg.address} "
          f"({'INSECURE, local testing only' if cfg.insecure else 'TLS'})")
    policy = SitePolicy(dp=cfg.dp, target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta)
    print(f"site {cfg.site_id}: privacy policy (this file's, not the coordinator's): {policy.describe()}; "
          f"trusted apps: {', '.join(h[:16] + '...' for h in cfg.trusted_apps) or 'ANY (insecure mode)'}")
    print(f"site {cfg.site_id}: ledger key {fp} — give it to your privacy officer out of band")
    if args.dry_run:
        print(" ".join(argv))
        return 0
    sys.stdout.flush()
    env = {**os.environ, **OFFLINE_ENV}
    if cfg.trusted_apps:  # required over TLS; an --insecure test site without pins runs any app
        env = launcher_env(cfg.state_dir, cfg.trusted_apps, env)
    # become the SuperNode: stopping this process (Ctrl-C, SIGTERM, a service manager) stops it
    os.execvpe(argv[0], argv, env)


def _cmd_generate(args: argparse.Namespace) -> int:
    from fedpeft.export import generate
    from fedpeft.runtime import quiet_libraries

    quiet_libraries()  # the answers, not the libraries' load reports and deprecation notices

    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ValueError(f"ADAPTER={args.adapter!r}: not a PEFT adapter folder (no adapter_config.json)")
    prompts = list(args.prompt or [])
    if not prompts:
        prompts = [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("--prompt: give at least one prompt (or lines on standard input)")
    for prompt, answer in zip(prompts, generate(args.adapter, prompts, max_new_tokens=args.max_new_tokens,
                                                precision=args.precision)):
        print(f"> {prompt}\n{answer.strip()}\n")
    return 0


def _cmd_app_hash(args: argparse.Namespace) -> int:
    from fedpeft.deploy.apptrust import app_hash

    if not (Path(args.app) / "pyproject.toml").is_file():
        raise ValueError(f"APP={args.app!r}: not a Flower app folder (no pyproject.toml)")
    print(app_hash(args.app))
    return 0


def _cmd_roster(args: argparse.Namespace) -> int:
    from fedpeft.secagg.site import write_roster

    roster = write_roster(args.keys, args.out)
    print(f"{args.out}: {len(roster)} sites ({', '.join(map(str, sorted(roster)))}); give every site this file "
          "([secagg] roster in its config)")
    return 0


def configure_logging(*, verbose: bool) -> None:
    """Each event once: fedpeft's lines through its own handler only (not again through a root
    handler Flower or Ray installs), and Flower's strategy banner, run-config dumps and per-round
    summaries folded away (the config is in metrics.json, the rounds in fedpeft's own lines and
    the progress bar). ``--verbose`` brings Flower's and Ray's lines back."""
    if not any(getattr(h, "_fedpeft", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._fedpeft = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from fedpeft.runtime import quiet_flower

    if verbose:
        os.environ["FEDPEFT_VERBOSE"] = "1"  # Ray workers read it too (fedpeft.runtime.quiet_libraries)
    quiet_flower(verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fedpeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="simulate N sites with Flower's Simulation Engine")
    sim.add_argument("--preset", default="hospitals",
                     help=f"{' | '.join(preset_names())} (simulations/*.toml) or path/to/preset.toml")
    sim.add_argument("--run-config", nargs="+", action="extend", default=None,
                     help="overrides, Flower syntax: \"key=value ...\" (repeatable: later flags add to earlier ones)")
    sim.add_argument("--out", default=None, help="output folder (default: the preset's out-dir)")
    sim.add_argument("--resume", default=None, metavar="DIR",
                     help="continue an interrupted run in DIR after its last complete round")
    sim.add_argument("--overwrite", action="store_true",
                     help="replace an earlier run in the output folder (its ledgers, keys and audit are deleted)")
    sim.add_argument("--verbose", action="store_true", help="also Flower's and Ray's own log lines")
    sim.add_argument("--ray-address", default=None, metavar="ADDR",
                     help="run on an existing Ray cluster (`ray start --head`; default: $RAY_ADDRESS, else a "
                          "local Ray this command starts and stops)")
    sim.set_defaults(func=_cmd_simulate)
    aud = sub.add_parser("audit", help="verify a run's signed privacy ledgers and recompute every site's epsilon")
    aud.add_argument("run_dir", metavar="DIR", help="a run folder (out-dir of a simulation or coordinator)")
    aud.add_argument("--keys", default=None,
                     help="folder of the sites' own site-<id>.pub, collected from the sites out of band (without "
                          "it the audit trusts the coordinator's copies in DIR/ledger: at best a QUALIFIED PASS)")
    aud.add_argument("--tolerance", type=float, default=0.02, help="relative tolerance between accountants")
    aud.add_argument("--empirical", action="store_true",
                     help="also run gradient canaries through each site's DP step: a lower bound on epsilon")
    aud.add_argument("--canaries", type=int, default=2000, help="canaries per site for --empirical")
    aud.set_defaults(func=_cmd_audit)
    crt = sub.add_parser("certs", help="make a CA, the coordinator's TLS certificate and the sites' node keys")
    crt.add_argument("--out", default="certs", help="folder for the certificates and keys")
    crt.add_argument("--san", action="append", required=True,
                     help="a host name or IP the sites will dial (repeat: --san coord.example.org --san 127.0.0.1)")
    crt.add_argument("--sites", type=int, required=True, help="number of site key pairs")
    crt.add_argument("--force", action="store_true", help="replace existing keys and certificates")
    crt.set_defaults(func=_cmd_certs)
    co = sub.add_parser("coordinator", help="start/stop the SuperLink, register sites, launch a run")
    co.add_argument("action", choices=["start", "stop", "register", "run"])
    co.add_argument("keys", nargs="*", help="register: the sites' auth.pub files")
    co.add_argument("--state-dir", default="coordinator", help="SuperLink state, log, PID and flwr config")
    co.add_argument("--certs", default="certs", help="folder from `fedpeft certs`")
    co.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on")
    co.add_argument("--port", type=int, default=9092, help="the sites' port (Fleet API only)")
    co.add_argument("--internal-port", type=int, default=None,
                    help="the SuperLink's own port, on 127.0.0.1 only (default: --port + 1)")
    co.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (local testing only)")
    co.add_argument("--app", default=str(Path(__file__).resolve().parents[1]), help="run: the Flower app folder")
    co.add_argument("--run-config", default=None, help="run: overrides, Flower syntax, or a preset .toml path")
    co.add_argument("--timeout", type=float, default=None, help="run: seconds before giving up")
    co.set_defaults(func=_cmd_coordinator)
    st = sub.add_parser("site", help="validate a site config, then run this site's SuperNode")
    st.add_argument("config", metavar="CONFIG.toml")
    st.add_argument("--insecure", action="store_true", help="connect without TLS (local testing only)")
    st.add_argument("--dry-run", action="store_true", help="validate and print the SuperNode command")
    st.add_argument("--fingerprint", action="store_true",
                    help="print this site's ledger key fingerprint (making the key if needed) and exit")
    st.set_defaults(func=_cmd_site)
    ah = sub.add_parser("app-hash", help="the SHA-256 of the Flower app `flwr run APP` would submit (pin it "
                                         "in each site's [app] trusted)")
    ah.add_argument("app", metavar="APP", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    ah.set_defaults(func=_cmd_app_hash)
    ro = sub.add_parser("roster", help="the secure-aggregation roster (the sites' ledger keys) from KEYS/site-<id>.pub")
    ro.add_argument("keys", metavar="KEYS")
    ro.add_argument("--out", default="roster.json")
    ro.set_defaults(func=_cmd_roster)
    gen = sub.add_parser("generate", help="answer prompts with a causal-lm adapter (greedy), to try the result")
    gen.add_argument("adapter", metavar="ADAPTER", help="an exported adapter folder, e.g. runs/clinical-gen/adapter")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); none: one per line on standard input")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    gen.set_defaults(func=_cmd_generate)
    args = parser.parse_args(argv)
    configure_logging(verbose=bool(getattr(args, "verbose", False)))
    try:
        return int(args.func(args))
    except (ValueError, FileExistsError) as e:  # config errors: one clear line, no traceback
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Flower's engine leaves ThreadPoolExecutor workers blocked on replies that will never come
        # (Ray is gone) and the interpreter would join them at exit; everything worth keeping is on
        # disk already (checkpoints and metrics.json are written atomically each round).
        os._exit(130)


if __name__ == "__main__":
    raise SystemExit(main())
