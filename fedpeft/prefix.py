"""Frozen-prefix cache: the encoder layers below the first adapted layer never change during a
run, so their output for a set of notes is computed once and reused by every epoch, round and
evaluation.

Hand-written: neither peft nor transformers caches frozen-layer activations across training
calls. It is what lets a hospital train on ~1,000 notes for several epochs on a CPU, and DP
accuracy grows with the notes per site.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.utils.data import TensorDataset

from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.io import atomic_write_bytes
from fedpeft.models import autocast

log = logging.getLogger(__name__)

CACHE_BUDGET_BYTES = 1 << 30  # per process; a 3,600-note site at 48 tokens x 384 dims in bfloat16 takes ~130 MB
CACHE_DIR_ENV = "FEDPEFT_PREFIX_CACHE"
CACHE_BYTES_ENV = "FEDPEFT_CACHE_BYTES"
DISK_BYTES_ENV = "FEDPEFT_PREFIX_DISK_BYTES"
WORKERS_ENV = "FEDPEFT_WORKERS"


def layer_local(method: str) -> bool:
    """The method touches only the layers lora-layers names (its registry entry says)."""
    from fedpeft.methods import adapter_method  # peft and Opacus: only when a model is built

    return adapter_method(method).layer_local


FFN_TARGETS = ("intermediate.dense",)  # modules inside a layer's feed-forward block, after its attention


class PrefixDataset(TensorDataset):
    """(hidden states entering layer ``start_layer`` — or, with ``ffn_start``, that layer's
    attention output — , attention mask, labels); ``ids``: the token ids as well, for tasks that
    generate from the prompts (causal-lm)."""

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *, start_layer: int,
                 ffn_start: bool = False, ids: torch.Tensor | None = None) -> None:
        super().__init__(hidden, mask, labels)
        self.start_layer = start_layer
        self.ffn_start = ffn_start
        self.ids = ids
        # what evaluation derives from these frozen states and keeps across rounds (the held-out
        # prompts' frozen keys and values: ~2.5 MB a prompt for SmolLM2 in bfloat16); see memo_bytes
        self.memo: dict[Any, Any] = {}

    @property
    def memo_bytes(self) -> int:
        """Bytes the memo holds (its values report ``nbytes``), for the caches' budgets."""
        return sum(int(getattr(v, "nbytes", 0)) for v in self.memo.values())


def prefix_start(model: ModelConfig, adapter: AdapterConfig) -> int:
    """First adapted layer when everything below it is frozen and cacheable, else 0 (no cache)."""
    layers = adapter.layer_list
    if model.pooling != "mean" or not layers or not layer_local(adapter.method):
        return 0
    return min(layers)


def ffn_start(model: ModelConfig, adapter: AdapterConfig) -> bool:
    """True when LoRA adapts only feed-forward modules: then the first adapted layer's attention
    block is frozen too and its output is what gets cached."""
    return (adapter.method == "lora" and prefix_start(model, adapter) > 0
            and all(t in FFN_TARGETS for t in adapter.target_module_list))


def start_of(data: TensorDataset) -> dict[str, Any]:
    """Keyword arguments that make the model start where ``data``'s cached states were taken."""
    if isinstance(data, PrefixDataset):
        return {"start_layer": data.start_layer, "ffn_start": data.ffn_start}
    return {}


def length_batches(mask: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices in batches of at most ``size``, shortest notes first (less padding per batch)."""
    order = torch.argsort(mask.sum(1), stable=True)
    return [order[i:i + size] for i in range(0, len(order), size)]


def trim(ids_or_hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns no row of this batch uses (exact: padded keys are masked out)."""
    length = max(1, int(mask.sum(1).max())) if mask.numel() else 1
    return ids_or_hidden[:, :length], mask[:, :length]


@torch.no_grad()
def compute_prefix(model: torch.nn.Module, data: TensorDataset, *, start_layer: int, ffn_start: bool = False,
                   batch_size: int = 128, precision: str = "float32") -> PrefixDataset:
    """Run the frozen layers (and with ``ffn_start`` the first adapted layer's attention) once over
    token data, batching notes of similar length together.

    With ``precision='bfloat16'`` they run under autocast and are kept in bfloat16 (half the bytes)."""
    ids, mask, labels = data.tensors
    device = next(model.parameters()).device
    dtype = getattr(torch, precision)
    hidden: torch.Tensor | None = None
    for idx in length_batches(mask, batch_size):
        b_ids, b_mask = trim(ids[idx], mask[idx])
        with autocast(device, precision):
            h = model.prefix_states(b_ids.to(device), b_mask.to(device), stop=start_layer,
                                    through_attention=ffn_start)
        if hidden is None:
            hidden = torch.zeros((len(ids), ids.shape[1], h.shape[-1]), dtype=dtype)
        hidden[idx, :h.shape[1]] = h.to("cpu", dtype)
    if hidden is None:
        width: int = model.config.hidden_size  # type: ignore[assignment]  # nn.Module.__getattr__ is untyped
        hidden = torch.zeros((0, ids.shape[1], width), dtype=dtype)
    return PrefixDataset(hidden, mask, labels, start_layer=start_layer, ffn_start=ffn_start)


def fingerprint(texts: Sequence[str], labels: Sequence[int], key: tuple, targets: Sequence[str] = ()) -> str:
    h = hashlib.sha256(repr(key).encode())
    for t, y in zip(texts, labels, strict=True):
        h.update(f"{y}\x00{t}\x01".encode())
    for r in targets:
        h.update(f"{r}\x02".encode())
    return h.hexdigest()


def _nbytes(ds: PrefixDataset) -> int:
    return ds.tensors[0].numel() * ds.tensors[0].element_size() + ds.memo_bytes


def memory_budget(fraction: float = 0.4) -> int:
    """Bytes this process may keep cached: a share of the machine's memory split among the
    workers that run at once ($FEDPEFT_WORKERS, set by ``fedpeft simulate``); $FEDPEFT_CACHE_BYTES overrides."""
    if os.environ.get(CACHE_BYTES_ENV):
        return int(float(os.environ[CACHE_BYTES_ENV]))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    workers = max(1, int(os.environ.get(WORKERS_ENV, "1") or 1))
    return int(total * fraction / workers)


def disk_budget(folder: Path) -> int:
    """Bytes the shared prefix folder may hold: $FEDPEFT_PREFIX_DISK_BYTES, else a quarter of the
    disk's free space, at most 4 GiB (100,000 sites' prefixes would not fit on most disks)."""
    if os.environ.get(DISK_BYTES_ENV):
        return int(float(os.environ[DISK_BYTES_ENV]))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 4 << 30
    return min(4 << 30, free // 4)


def trim_folder(folder: Path, budget: int, *, pattern: str = "*.safetensors") -> int:
    """Delete the least recently used files (by mtime; a hit touches its file) until the folder's
    ``pattern`` files fit in ``budget`` bytes; return the bytes kept."""
    files = []
    for p in folder.glob(pattern):
        try:
            st = p.stat()
        except OSError:
            continue  # another worker removed it
        files.append((st.st_mtime_ns, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for _, size, p in sorted(files, key=lambda f: f[0]):
        if total <= budget:
            break
        p.unlink(missing_ok=True)
        total -= size
    return total


class BytesLRU:
    """A least-recently-used map bounded by the bytes of its values (thread-safe)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        if nbytes > self.budget:  # never kept; an entry that has grown past the budget goes
            with self._lock:
                old = self._items.pop(key, None)
                self._bytes -= old[1] if old is not None else 0
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.budget:
                _, (_, n) = self._items.popitem(last=False)
                self._bytes -= n

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used(self) -> int:
        """Bytes counted against the budget."""
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class PrefixCache:
    """LRU of ``PrefixDataset`` by content fingerprint, bounded in bytes (one per process).

    With ``$FEDPEFT_PREFIX_CACHE`` set to a folder, entries are also kept there as safetensors
    (atomic writes), so processes that share the folder share the work: ``fedpeft simulate``
    points its Ray workers at one temporary folder and deletes it afterwards. The folder is
    bounded too (``disk_budget``; least recently used files go first). The files hold
    activations of the site's own notes: keep such a folder on the site, like the notes.
    """

    def __init__(self, budget_bytes: int = CACHE_BUDGET_BYTES) -> None:
        self._lru = BytesLRU(budget_bytes)
        self.hits = self.misses = 0

    @staticmethod
    def _file(key: str) -> Path | None:
        folder = os.environ.get(CACHE_DIR_ENV)
        return Path(folder) / f"{key}.safetensors" if folder else None

    def get(self, key: str) -> PrefixDataset | None:
        ds = self._lru.get(key)
        if ds is not None:
            self.hits += 1
            return ds
        path = self._file(key)
        if path is not None and path.exists():
            try:
                with safe_open(str(path), framework="pt") as fh:  # one read: tensors and metadata
                    meta = fh.metadata()
                    ds = PrefixDataset(fh.get_tensor("hidden"), fh.get_tensor("mask"), fh.get_tensor("labels"),
                                       start_layer=int(meta["start_layer"]), ffn_start=meta.get("ffn_start") == "1",
                                       ids=fh.get_tensor("ids") if "ids" in fh.keys() else None)
            except Exception as e:  # a damaged cache file is recomputed, never trusted
                log.warning("prefix cache %s unreadable (%s); recomputing", path, e)
            else:
                self._lru.put(key, ds, _nbytes(ds))
                self.hits += 1
                with contextlib.suppress(OSError):  # recently used: the disk bound evicts it last
                    os.utime(path)
                return ds
        self.misses += 1
        return None

    def put(self, key: str, ds: PrefixDataset) -> None:
        self._lru.put(key, ds, _nbytes(ds))
        path = self._file(key)
        if path is not None:
            hidden, mask, labels = (t.contiguous() for t in ds.tensors)
            tensors = {"hidden": hidden, "mask": mask, "labels": labels}
            if ds.ids is not None:
                tensors["ids"] = ds.ids.contiguous()
            data = save(tensors,
                        metadata={"start_layer": str(ds.start_layer), "ffn_start": str(int(ds.ffn_start))})
            atomic_write_bytes(path, data)
            trim_folder(path.parent, disk_budget(path.parent))

    def clear(self) -> None:
        self._lru.clear()
