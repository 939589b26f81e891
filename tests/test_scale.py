"""Cross-device scale: Flower's message pump asks only nodes with mail, a fixed number of sites
per round whatever the federation's size, sigma calibrations shared through a run's folder, the
prefix folder bounded on disk, and site order memoised (the same as the brute-force sort)."""

from __future__ import annotations

import inspect
import os
import threading
from queue import Queue
from types import SimpleNamespace

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fedpeft import simengine
from fedpeft.config import DataConfig
from fedpeft.data.sites import simulated_site, site_sizes
from fedpeft.prefix import trim_folder
from fedpeft.privacy import accountant
from fedpeft.runconfig import ConfigError, from_run_config
from fedpeft.strategy import make_strategy


class _State:
    """A LinkState as Flower 1.41's InMemoryLinkState keeps messages: a dict and a lock."""

    def __init__(self, dst: list[int], delivered: set[int]) -> None:
        meta = lambda n: SimpleNamespace(dst_node_id=n, delivered_at="x" if n in delivered else "")  # noqa: E731
        self.message_ins_store = {f"m{i}": SimpleNamespace(metadata=meta(n)) for i, n in enumerate(dst)}
        self.lock = threading.RLock()
        self.asked: list[int] = []

    def get_message_ins(self, *, node_id: int, limit: int) -> list[str]:
        self.asked.append(node_id)
        return [f"for-{node_id}"]


def _pump(state: _State, mapping: dict[int, int], sweep: int) -> list[str]:
    """Run the pump until it has asked ``sweep`` nodes (one sweep), then stop it."""
    q: Queue[str] = Queue()
    stop = threading.Event()
    t = threading.Thread(target=simengine.add_pending_messages_to_queue, args=(state, q, mapping, stop))
    t.start()
    while len(state.asked) < sweep and t.is_alive():
        pass
    stop.set()
    t.join(5)
    return [q.get() for _ in range(q.qsize())]


def test_pump_asks_only_nodes_with_undelivered_messages_in_partition_order():
    # Prepare: 1,000 nodes (node id -> partition id, ids out of partition order); mail for 3, one delivered
    mapping = {1000 + 7 * p % 1000: p for p in range(1000)}
    by_partition = {p: n for n, p in mapping.items()}
    mail = [by_partition[900], by_partition[5], by_partition[42], by_partition[77]]
    state = _State(mail, delivered={by_partition[77]})
    # Execute
    got = _pump(state, mapping, 3)
    # Assert: only the three nodes with undelivered mail were asked, smallest partition first
    first = state.asked[:3]
    assert first == [by_partition[5], by_partition[42], by_partition[900]]
    assert set(state.asked) == set(first) and got[:3] == [f"for-{n}" for n in first]


def test_pump_falls_back_to_every_node_on_an_unknown_state():
    # Prepare: a state without Flower's in-memory store
    class Other:
        asked: list[int] = []

        def get_message_ins(self, *, node_id: int, limit: int) -> list[str]:
            self.asked.append(node_id)
            return []

    mapping = {11: 0, 12: 1, 13: 2}
    other = Other()
    q: Queue[str] = Queue()
    stop = threading.Event()
    t = threading.Thread(target=simengine.add_pending_messages_to_queue, args=(other, q, mapping, stop))
    # Execute
    t.start()
    while len(other.asked) < 3:
        pass
    stop.set()
    t.join(5)
    # Assert: Flower's own sweep (every node, in mapping order)
    assert other.asked[:3] == [11, 12, 13] and simengine.pending_nodes(other) is None


def test_pump_replacement_keeps_flowers_signature_and_is_restored():
    # Prepare
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    # Execute
    with simengine.fast_message_pump():
        inside = vce_api.add_messages_to_queue
    # Assert: same parameters as Flower's, swapped in, then restored
    assert list(inspect.signature(original).parameters) == \
        list(inspect.signature(simengine.add_pending_messages_to_queue).parameters)
    assert inside is simengine.add_pending_messages_to_queue and vce_api.add_messages_to_queue is original


@pytest.mark.parametrize("num_sites", [1000, 9999, 100_000, 123_457])
def test_sites_per_round_samples_exactly_that_many(num_sites):
    # Prepare
    cfg = from_run_config({"num-sites": num_sites, "sites-per-round": 20, "dp": False})
    # Execute
    s = make_strategy(cfg)
    # Assert: Flower's FedAvg sample size, max(int(n * fraction), min nodes), for train and evaluate
    assert max(int(num_sites * s.fraction_train), s.min_train_nodes) == 20
    assert max(int(num_sites * s.fraction_evaluate), s.min_evaluate_nodes) == 20


@pytest.mark.parametrize("value,needle", [(-1, "sites-per-round=-1"), (11, "sites-per-round=11"),
                                          (1, "min-train-sites=2")])
def test_sites_per_round_out_of_range_is_refused(value, needle):
    with pytest.raises(ConfigError, match=needle):
        from_run_config({"num-sites": 10, "sites-per-round": value})


def test_site_order_is_the_brute_force_sort():
    # Prepare
    cfg = DataConfig(quantity_skew=0.8, notes_per_site=40)
    n = 2000
    sizes = site_sizes(num_sites=n, mean=40, sigma=0.8, seed=3)
    # Execute
    order = [simulated_site(i, n, cfg, seed=3) for i in range(n)]
    # Assert: largest first, ties by id (the sort simulated_site used to do per call)
    assert order == sorted(range(n), key=lambda s: (-int(sizes[s]), s))
    assert not sizes.flags.writeable  # memoised: nobody may change it in place


def test_sigma_memo_shared_through_a_folder_is_opacus_value(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv(accountant.SIGMA_CACHE_ENV, str(tmp_path))
    args = dict(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.25, steps=12, accountant="rdp")
    oracle = float(get_noise_multiplier(**args))
    accountant.calibrate_noise.cache_clear()
    # Execute: first call calibrates and writes; a fresh process (cache cleared) reads it back
    first = accountant.calibrate_noise(**args)
    files = list(tmp_path.glob("sigma-*.json"))
    accountant.calibrate_noise.cache_clear()
    files[0].write_text(files[0].read_text().replace('"steps": 12', '"steps": 13').replace(str(first), "0.5"))
    other_args = accountant.calibrate_noise(**args)  # an entry saved for other arguments is not used
    accountant.calibrate_noise.cache_clear()
    files[0].write_text("{not json")
    damaged = accountant.calibrate_noise(**args)
    accountant.calibrate_noise.cache_clear()
    again = accountant.calibrate_noise(**args)
    # Assert: exactly Opacus' search result every time; a mismatched or damaged entry is recalibrated
    assert len(files) == 1 and first == oracle and other_args == oracle and damaged == oracle and again == oracle
    assert '"steps": 12' in files[0].read_text()  # rewritten for the right arguments
    accountant.calibrate_noise.cache_clear()


def test_prefix_folder_drops_least_recently_used_files_over_budget(tmp_path):
    # Prepare: four 1,000-byte files, used in the order c, a, d, b (oldest first)
    for i, name in enumerate("cadb"):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(b"x" * 1000)
        os.utime(p, ns=(10**9 * (i + 1), 10**9 * (i + 1)))
    (tmp_path / "sigma-1.json").write_text("{}")  # not a prefix file: never counted or removed
    # Execute
    kept = trim_folder(tmp_path, 2500)
    # Assert: the two oldest go, the folder fits
    assert kept == 2000 and sorted(p.name for p in tmp_path.iterdir()) == \
        ["b.safetensors", "d.safetensors", "sigma-1.json"]
