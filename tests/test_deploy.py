"""Deployment: certificates, site config validation (before any connection), and real processes on
127.0.0.1 — a TLS + node-authenticated SuperLink and two SuperNodes started by the `fedpeft`
commands the deploy guide uses, bounded in time, every process gone afterwards."""

from __future__ import annotations

import atexit
import csv
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from cryptography import x509

from fedpeft.config import ConfigError
from fedpeft.data.notes import LABELS, generate_notes
from fedpeft.deploy.certs import make_certs
from fedpeft.deploy.coordinator import Coordinator
from fedpeft.deploy.site_config import load_site_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TREE = Path(__file__).resolve().parents[1]
# what the FAB leaves out anyway (the tree's .gitignore): not worth copying
BUILD_LEFTOVERS = (".git", *(line.strip().strip("/") for line in (TREE / ".gitignore").read_text().splitlines()
                             if line.strip() and not line.startswith("#")))


@functools.lru_cache(maxsize=1)
def _app() -> Path:
    """A copy of the app taken once: the sites pin its hash, and the runs build their FAB from it, so
    a file edited in the working tree while the suite runs cannot make the two differ."""
    snapshot = Path(tempfile.mkdtemp(prefix="fedpeft-app-")) / "app"
    shutil.copytree(TREE, snapshot, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    atexit.register(shutil.rmtree, snapshot.parent, True)
    return snapshot


@functools.lru_cache(maxsize=1)
def _app_hash() -> str:
    from fedpeft.deploy.apptrust import app_hash

    return app_hash(_app())


def _site_files(root: Path, site: int, port: int, certs: Path, **over) -> Path:
    texts, labels = generate_notes(n=80, seed=20 + site)
    data = root / f"site{site}.csv"
    with data.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["note", "diagnosis"])
        w.writerows([t, LABELS[y]] for t, y in zip(texts, labels))
    fields = {"address": f"127.0.0.1:{port}", "label_column": "diagnosis", "path": str(data),
              "labels": json.dumps(list(LABELS)), "trusted": json.dumps([_app_hash()]), "privacy": "", **over}
    cfg = root / f"site{site}.toml"
    cfg.write_text(f"""[site]
id = {site}
state-dir = "state-site{site}"
api-port = {_free_port()}

[coordinator]
address = "{fields['address']}"
ca-cert = "{certs / 'ca.crt'}"
auth-key = "{certs / f'site-{site}' / 'auth'}"

[data]
path = "{fields['path']}"
text-column = "note"
label-column = "{fields['label_column']}"
labels = {fields['labels']}

[privacy]
target-epsilon = 6.0
{fields['privacy']}
[app]
trusted = {fields['trusted']}
""")
    return cfg


def test_certs_are_valid_private_keys_0600_and_never_overwritten(tmp_path):
    # Execute
    paths = make_certs(tmp_path, sans=["coord.example.org", "127.0.0.1"], sites=2)
    # Assert: the server certificate is signed by the CA and names both SANs; keys are private
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]  # loopback: always
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for p in (paths.ca_key, paths.server_key, *(k for k, _ in paths.site_keys.values())):
        assert p.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_certs(tmp_path, sans=["127.0.0.1"], sites=2)
    make_certs(tmp_path, sans=["127.0.0.1"], sites=2, force=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    make_certs(out, sans=["127.0.0.1", "localhost"], sites=3)
    return out


@pytest.mark.parametrize("over, field, message", [
    ({"path": "/nonexistent/notes.csv"}, "data.path", "no such file"),
    ({"label_column": "label"}, "data.label-column", "missing column 'label'"),
    ({"labels": json.dumps(list(LABELS)[:-1])}, "data.labels", "unknown label"),
    ({"address": "127.0.0.1:99999"}, "coordinator.address", "port in 1-65535"),
    ({"address": "https://coord:9092"}, "coordinator.address", "must be host:port"),
])
def test_bad_site_config_fails_before_connecting_naming_the_field(tmp_path, certs, over, field, message):
    cfg = _site_files(tmp_path, 0, 9092, certs, **over)
    with pytest.raises(ConfigError, match=rf"^{field}.*{message}"):
        load_site_config(cfg)


@pytest.mark.parametrize("section, typo, suggestion", [
    ("privacy", "target-epsion = 3.0", "privacy.target-epsilon"),
    ("coordinator", 'auth_key = "x"', "coordinator.auth-key"),
    ("data", 'lable-column = "x"', "data.label-column"),
])
def test_an_unknown_key_in_any_section_fails_and_suggests_the_closest(tmp_path, certs, section, typo, suggestion):
    # Prepare: the typo added to its section of an otherwise valid file
    cfg = _site_files(tmp_path, 0, 9092, certs)
    cfg.write_text(cfg.read_text().replace(f"[{section}]\n", f"[{section}]\n{typo}\n", 1))
    # Execute / Assert: an error naming the key and the closest known one, never a silent default
    key = f"{section}.{typo.split(' =')[0]}"
    with pytest.raises(ConfigError, match=rf"^{key}: unknown key \(did you mean '{suggestion}'\?"):
        load_site_config(cfg)


def test_a_passphrase_protected_node_key_gets_a_clear_message(tmp_path, certs):
    import shutil

    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH's ssh-keygen (the guide's command)")
    # Prepare: what `ssh-keygen -t ecdsa -b 384` makes when given a passphrase, and without one
    key = tmp_path / "auth"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(key)], check=True)
    plain = tmp_path / "plain"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(plain)], check=True)
    cfg = _site_files(tmp_path, 0, 9092, certs)
    cfg.write_text(cfg.read_text().replace(str(certs / "site-0" / "auth"), str(key)))
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"^coordinator.auth-key=.*passphrase.*ssh-keygen -t ecdsa -b 384 -N"):
        load_site_config(cfg)
    # the guide's command (-N "") makes one that works
    cfg.write_text(cfg.read_text().replace(str(key), str(plain)))
    assert load_site_config(cfg).auth_key == plain


def test_a_site_must_pin_the_apps_it_runs_and_pins_are_hashes(tmp_path, certs):
    cfg = _site_files(tmp_path, 0, 9092, certs)
    text = cfg.read_text()
    cfg.write_text(text.replace(f"trusted = {json.dumps([_app_hash()])}", ""))
    with pytest.raises(ConfigError, match=r"^app.trusted: missing"):
        load_site_config(cfg)
    cfg.write_text(text.replace(_app_hash(), "abc"))
    with pytest.raises(ConfigError, match=r"^app.trusted='abc': must be a list of SHA-256"):
        load_site_config(cfg)
    # the node config carries the site's own policy
    nc = load_site_config(_site_files(tmp_path, 0, 9092, certs)).node_config()
    assert 'dp="true"' in nc and "target-epsilon=6.0" in nc


def test_a_generative_site_reads_its_instruction_file_and_refuses_a_run_of_another_task(tmp_path, certs):
    from fedpeft.data.instructions import generate_referrals
    from fedpeft.policy import SiteError, apply_node_config
    from fedpeft.runconfig import from_run_config

    # Prepare: a chat-format JSONL file; [data] task = "causal-lm", no labels
    prompts, _, responses = generate_referrals(n=12, seed=4)
    data = tmp_path / "site0.jsonl"
    data.write_text("\n".join(json.dumps({"messages": json.loads(p) + [{"role": "assistant", "content": r}]})
                              for p, r in zip(prompts, responses)) + "\n")
    cfg = _site_files(tmp_path, 0, 9092, certs, path=str(data))
    text = cfg.read_text().replace('[data]\n', '[data]\ntask = "causal-lm"\n')
    cfg.write_text(text)
    # Execute
    site = load_site_config(cfg)
    nc = dict(item.split("=", 1) for item in site.node_config().split(" "))
    # Assert: the node config names the task and carries no class list
    assert site.examples == 12 and nc["task"] == '"causal-lm"' and "labels" not in nc
    node = {"task": "causal-lm", "dp": "true", "target-epsilon": 6.0, "target-delta": 1e-5}
    run = from_run_config({"task": "causal-lm", "model": "tiny-llama", "data": "referrals", "target-epsilon": 6.0})
    assert apply_node_config(run, node, deployed=True).model.task == "causal-lm"
    with pytest.raises(SiteError, match=r"task='classification' \(run config\) but this site's data is for "
                                        r"task='causal-lm'"):
        apply_node_config(from_run_config({"target-epsilon": 6.0}), node, deployed=True)
    # a bad row is named with its line and field
    data.write_text(data.read_text() + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"^data.path: .*site0.jsonl: line 13: field 'output' is missing"):
        load_site_config(cfg)
    cfg.write_text(text.replace('task = "causal-lm"', 'task = "generation"'))
    with pytest.raises(ConfigError, match=r"^data.task='generation': must be one of classification, causal-lm"):
        load_site_config(cfg)


def test_the_gateway_forwards_the_fleet_api_only():
    from fedpeft.deploy.gateway import allowed

    assert allowed("POST", "/v1/fleet/pull-messages")
    for method, path in [("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-runs"),
                         ("POST", "/v1/runtime/acquire-task"), ("GET", "/v1/fleet/pull-messages"),
                         ("POST", "/v1/fleet/../control/start-run"), ("POST", "/v1/fleet/%2e%2e/control/stop-run"),
                         ("GET", "/docs"), ("POST", "/v1/fleet//x")]:
        assert not allowed(method, path), (method, path)


def test_register_asks_again_while_the_superlink_is_unavailable_and_fails_on_other_errors(tmp_path, monkeypatch):
    from fedpeft.deploy.coordinator import CoordinatorError
    # Prepare: a Flower CLI that answers "unavailable" twice, then registers; another that refuses
    answers = [(1, "Connection to the SuperLink is unavailable."), (1, "Connection to the SuperLink is unavailable."),
               (0, "registered node key")]
    calls = []

    def fake(*args, timeout=None, check=True):
        calls.append(args)
        rc, out = answers[len(calls) - 1]
        return subprocess.CompletedProcess(args, rc, out, "")

    coord = Coordinator(tmp_path / "c", None, port=_free_port())
    monkeypatch.setattr(coord, "flwr", fake)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    # Execute / Assert: the third ask succeeds
    assert coord.register(tmp_path / "auth.pub") == "registered node key" and len(calls) == 3
    # a refusal that is not "unavailable" fails at once, naming the key
    answers[:] = [(1, "Public key already registered")]
    calls.clear()
    with pytest.raises(CoordinatorError, match="auth.pub.*already registered"):
        coord.register(tmp_path / "auth.pub")
    assert len(calls) == 1


def test_site_refuses_to_run_without_tls_unless_insecure(tmp_path, certs):
    cfg = _site_files(tmp_path, 0, 9092, certs)
    cfg.write_text(cfg.read_text().replace(f'ca-cert = "{certs / "ca.crt"}"\n', ""))
    with pytest.raises(ConfigError, match="coordinator.ca-cert: missing; a site only connects over TLS"):
        load_site_config(cfg)
    args = load_site_config(cfg, insecure=True).supernode_args()
    assert "--insecure" in args and "--root-certificates" not in args


# ---- real processes ------------------------------------------------------------------------



def _spawn_site(cfg: Path, log: Path) -> subprocess.Popen:
    """A site's SuperNode with its own FLWR_HOME (where Flower would install a run's app)."""
    home = cfg.parent / f"flwr-home-{cfg.stem}"
    return subprocess.Popen([sys.executable, "-m", "fedpeft.cli", "site", str(cfg)], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, cwd=cfg.parent, start_new_session=True,
                            env={**os.environ, "FEDPEFT_WORKERS": "1", "FLWR_HOME": str(home)})


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (the SuperNode and its helpers), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers that outlived the leader
        except ProcessLookupError:
            pass
        return


def _flower_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and "flower-" in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


@pytest.mark.slow
def test_tls_federation_survives_a_coordinator_crash_and_sites_refuse_weaker_runs_and_untrusted_apps(tmp_path, certs):
    """The guide's flow through real processes, in one federation (each process start costs seconds
    of imports on a 2-core machine). Coordinator (Fleet-only gateway) up; registered SuperNodes of
    sites 0 and 1 (they trust the app) train two rounds over TLS, sending float16 deltas, and
    evaluate. After round 1 is committed the coordinator's machine dies (SIGKILL to the SuperLink,
    its ServerApp and the gateway) while the sites keep running; `coordinator start` and
    `coordinator run` with resume=true continue after the last committed round: every round
    recorded once, every site's ledger holds exactly one DP release per round (a round the sites had
    already trained is resent, not retrained), and the audit passes. Then site 2 joins, pinning
    another app, and the coordinator asks for dp=false: sites 0 and 1 (their files: DP on) refuse
    before training, site 2 refuses the app before Flower installs any of it. Every process is
    gone after."""
    import threading

    from fedpeft.deploy.coordinator import CoordinatorError
    from fedpeft.privacy.audit.checks import audit_run

    # Prepare: the guide's steps — coordinator up, sites registered, SuperNodes started
    port = _free_port()
    coord = Coordinator(tmp_path / "coordinator", certs, host="127.0.0.1", port=port)
    coord.start()
    sites: list[subprocess.Popen] = []
    out = tmp_path / "run"
    base = ("model='tiny' lora-layers='' num-sites=2 min-train-sites=2 batch-size=16 global-test-size=60 "
            "target-epsilon=6.0")
    run_config = f"{base} num-server-rounds=2 delta-format='float16' out-dir='{out}'"
    try:
        for s in range(3):
            coord.register(certs / f"site-{s}" / "auth.pub")
        cfgs = [_site_files(tmp_path, s, port, certs) for s in range(2)]
        sites = [_spawn_site(c, tmp_path / f"site{s}.log") for s, c in enumerate(cfgs)]

        def first_run() -> None:
            try:
                coord.run(_app(), run_config, timeout=400)
            except (CoordinatorError, subprocess.TimeoutExpired):
                pass  # the coordinator dies under it

        t = threading.Thread(target=first_run, daemon=True)
        t.start()
        state = out / "server-state.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if state.exists() and json.loads(state.read_text())["round"] >= 1:
                break
            for s, p in enumerate(sites):
                if p.poll() is not None:
                    pytest.fail(f"site {s} exited: {(tmp_path / f'site{s}.log').read_text()[-2000:]}")
            time.sleep(0.1)
        else:
            pytest.fail("round 1 was never committed")
        # Execute: the crash (the machine: SuperLink, its ServerApp and the gateway), then the
        # guide's restart with resume=true
        for pid_file in (coord.pid_file, coord.gateway_pid_file):
            os.killpg(coord.running_pid(pid_file), signal.SIGKILL)
        t.join(timeout=120)
        killed_after = json.loads(state.read_text())["round"]
        coord.start()
        res = coord.run(_app(), run_config + " resume=true", timeout=400)
        # Assert: the global adapter, each round once, each site's privacy state and ledger (one
        # release per round), a passing audit; the deployed sites sent float16 deltas (half the
        # float32 bytes), signed as sent, and evaluated the global adapter
        assert (out / "adapter" / "adapter_model.safetensors").exists(), res.stdout[-2000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["resumed_after"] == killed_after == 1
        assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
        sent = [m["bytes_up"] for m in metrics["rounds"][-1]["sites"].values()]
        last = metrics["rounds"][-1]
        assert sent and all(b == metrics["adapter_bytes"] / 2 for b in sent), (
            sent, metrics.get("adapter_bytes"), {k: last.get(k) for k in ("skipped", "failures", "rejected", "retries")},
            res.stdout[-1500:], [(tmp_path / f"site{s}.log").read_text()[-1500:] for s in range(2)])
        assert metrics["dp_noise"]["source"] == "secret"
        evaluated = metrics["rounds"][-1]["sites"]  # federated evaluation, through the sites' ClientApp processes
        assert len(evaluated) == 2 and all(m.get("eval_loss") is not None for m in evaluated.values()), evaluated
        for s in range(2):
            state_dir = tmp_path / f"state-site{s}"
            assert (state_dir / f"privacy-site{s}.json").exists() and (state_dir / "site-key.pem").exists()
            entries = [json.loads(x) for x in (state_dir / "ledger.jsonl").read_text().splitlines()]
            assert [e["kind"] for e in entries] == ["open", "dp-sgd", "dp-sgd"], entries
            assert [e["round"] for e in entries[1:]] == [1, 2]
            assert entries[-1]["noise"] == "secret" and entries[-1]["deployed"] is True
            assert entries[-1]["target_epsilon"] == 6.0  # within the site's own budget, from its config
            assert (out / "ledger" / f"site-{s}.jsonl").read_bytes() == (state_dir / "ledger.jsonl").read_bytes()
        audit = audit_run(out)
        assert audit.ok, audit.failures
        # Execute: site 2 joins (it pins another app); the coordinator asks for training without DP
        sites.append(_spawn_site(_site_files(tmp_path, 2, port, certs, trusted=json.dumps(["0" * 64])),
                                 tmp_path / "site2.log"))
        weak = tmp_path / "weak"
        try:
            coord.run(_app(), f"{base} num-server-rounds=1 round-retries=0 fraction-evaluate=0 dp=false "
                           f"out-dir='{weak}'", timeout=300)
        except CoordinatorError:
            pass  # a run in which no site trains may end as failed; what matters is why
        # Assert: both DP sites refused before training (their ledgers hold no new release), and
        # site 2 refused the app it does not trust and never installed it
        reasons = " | ".join(f["reason"] for r in json.loads((weak / "metrics.json").read_text())["rounds"]
                             for f in r.get("failures", []))
        assert reasons.count("dp=false: the run config asks this site to train without") == 2, reasons
        assert reasons.count("not one this site trusts") == 1, reasons
        apps = tmp_path / "flwr-home-site2" / "apps"
        assert not apps.exists() or not any(apps.iterdir()), list(apps.iterdir())
        for s in range(2):
            entries = (tmp_path / f"state-site{s}" / "ledger.jsonl").read_text().splitlines()
            assert len(entries) == 3  # still open + 2 releases
    finally:
        for p in sites:
            _kill_group(p)
        coord.stop()
    # every process is gone
    deadline = time.monotonic() + 20
    while _flower_processes(str(port)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _flower_processes(str(port))
    assert coord.running_pid() is None and coord.running_pid(coord.gateway_pid_file) is None


@pytest.mark.slow
def test_unregistered_key_other_ca_and_plain_http_are_refused(tmp_path, certs):
    port = _free_port()
    coord = Coordinator(tmp_path / "coordinator", certs, host="127.0.0.1", port=port)
    coord.start()
    try:
        other = make_certs(tmp_path / "other", sans=["127.0.0.1"], sites=1)

        def supernode(ca: Path, key: Path) -> tuple[int, str]:
            """Exit code and log of a SuperNode that tries once (its helper child keeps pipes open,
            so the log goes to a file and the whole process group is killed afterwards)."""
            log = tmp_path / f"supernode-{_free_port()}.log"
            proc = subprocess.Popen(["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--root-certificates",
                                     str(ca), "--auth-supernode-private-key", str(key), "--port", str(_free_port()),
                                     "--max-retries", "1", "--max-wait-time", "10"],
                                    stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=90)
            finally:
                _kill_group(proc)
            return code, log.read_text()

        # site 2's key was never registered
        code, log = supernode(certs / "ca.crt", certs / "site-2" / "auth")
        assert code != 0 and "Failed to activate SuperNode" in log
        # a site that trusts another CA cannot connect (registered key, wrong trust root)
        coord.register(certs / "site-0" / "auth.pub")
        code, log = supernode(other.ca_cert, certs / "site-0" / "auth")
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in log
        # plain HTTP to the coordinator fails
        with pytest.raises((OSError, http.client.HTTPException)):  # URLError, reset or a TLS record as status line
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
        # a stranger holding only ca.crt (every site has it) can neither list, submit nor stop runs
        home = tmp_path / "stranger"
        home.mkdir()
        (home / "ca.crt").write_bytes((certs / "ca.crt").read_bytes())
        (home / "config.toml").write_text(f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = '
                                          f'"127.0.0.1:{port}"\nroot-certificates = "{home / "ca.crt"}"\n')
        env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
        for args in (["ls", "c"], ["run", str(_app()), "c"], ["stop", "123", "c"]):
            res = subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120)
            assert res.returncode != 0, (args, res.stdout[-1500:])
            assert "Successfully started run" not in res.stdout
        # control: the same stranger's `flwr ls` works on the SuperLink's own loopback port (what the
        # public port was before the gateway), and so does the operator's CLI (check=True)
        (home / "config.toml").write_text((home / "config.toml").read_text().replace(
            f":{port}", f":{coord.internal_port}"))
        res = subprocess.run(["flwr", "ls", "c"], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-1500:]
        coord.flwr("ls", timeout=60)
    finally:
        coord.stop()


def test_a_site_config_names_its_secure_aggregation_roster_in_the_node_config(tmp_path, certs):
    # Prepare: a valid site file with a [secagg] section (a path relative to the file)
    cfg = _site_files(tmp_path, 0, 9092, certs)
    cfg.write_text(cfg.read_text() + '\n[secagg]\nroster = "roster.json"\n')
    # Execute
    site = load_site_config(cfg)
    # Assert: the ClientApp reads it from the node config; a typo in the section is refused
    assert site.secagg_roster == cfg.parent / "roster.json"
    assert f'secagg-roster="{cfg.parent / "roster.json"}"' in site.node_config()
    cfg.write_text(cfg.read_text().replace("roster =", "rooster ="))
    with pytest.raises(ConfigError, match=r"^secagg.rooster: unknown key"):
        load_site_config(cfg)
