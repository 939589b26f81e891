"""GGUF files as causal-LM bases: a user's file loads as the model it was written from, is
dequantised once into a plain folder, and two files of one name and size never share a folder."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fedpeft import llm
from fedpeft.config import ModelConfig

VOCAB = 1024  # SmolLM2's first 1,024 tokens: its 17 special tokens, 256 bytes and 751 merged tokens


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``convert_hf_to_gguf`` order of a query/key projection's rows (transformers undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=2)
def _tokenizer_fields(vocab: int) -> list[tuple[str, Any, Any, Any]]:
    """The embedded SmolLM2's tokenizer fields, its vocabulary cut to the first ``vocab`` tokens and
    the merges among them (read once: parsing its 49k tokens takes ~3 s)."""
    import gguf

    fields = gguf.GGUFReader(str(llm.smollm2_gguf())).fields
    kept = set(fields["tokenizer.ggml.tokens"].contents()[:vocab])
    out = []
    for name, f in fields.items():
        if name.startswith("tokenizer."):
            value = f.contents()
            if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
                value = value[:vocab]
            elif name == "tokenizer.ggml.merges":
                value = [m for m in value if m.replace(" ", "") in kept and all(t in kept for t in m.split(" "))]
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            out.append((name, value, f.types[0], f.types[-1] if array else None))
    return out


def write_gguf(path: Path, model: torch.nn.Module) -> None:
    """A float32 GGUF of a transformers Llama, Mistral or Qwen2, as llama.cpp's converter lays it out
    (Llama and Mistral: architecture ``llama``, query/key rows permuted, a Mistral named as one;
    Qwen2: ``qwen2``, with its q/k/v biases), with the embedded SmolLM2's tokenizer cut to the
    model's vocabulary (a full 49k-token vocabulary takes ~3 s each time transformers parses the
    file). Test-only: llama.cpp's converter is not installed, gguf's writer is."""
    import gguf

    cfg = model.config
    qwen = cfg.model_type == "qwen2"
    w = gguf.GGUFWriter(str(path), "qwen2" if qwen else "llama")
    w.add_name(f"tiny-{cfg.model_type}")  # transformers takes a "llama" for a Mistral only if named exactly "mistral"
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, value, vtype, sub in _tokenizer_fields(cfg.vocab_size):
        w.add_key_value(name, value, vtype, sub_type=sub)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        for name, key in [("attn_norm", "input_layernorm"), ("attn_v", "self_attn.v_proj"),
                          ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                          ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:
            w.add_tensor(f"blk.{i}.{name}.weight", sd[f"{hf}{key}.weight"])
        q, k = sd[f"{hf}self_attn.q_proj.weight"], sd[f"{hf}self_attn.k_proj.weight"]
        if qwen:
            for name in ("q", "k", "v"):
                w.add_tensor(f"blk.{i}.attn_{name}.bias", sd[f"{hf}self_attn.{name}_proj.bias"])
        else:
            q, k = _permute(q, cfg.num_attention_heads), _permute(k, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{i}.attn_q.weight", q)
        w.add_tensor(f"blk.{i}.attn_k.weight", k)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_loads_as_the_model_it_was_written_from_once_and_in_its_own_folder(tmp_path, monkeypatch):
    # Prepare: two random Llamas (model seeds 0 and 1) as GGUF files of one name and one size in two
    # folders (two fine-tunes of one model), and an empty model cache
    monkeypatch.setenv(llm.HOME_ENV, str(tmp_path / "home"))
    models, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(llm.tiny_config("tiny-llama", VOCAB)).eval())
        paths.append(tmp_path / f"hospital{seed}" / "model.gguf")
        paths[-1].parent.mkdir()
        write_gguf(paths[-1], models[-1])
    assert paths[0].stat().st_size == paths[1].stat().st_size
    x = torch.tensor([[1, 504, 215, 314, 870, 2]])
    # Execute
    loaded = [llm.load_causal_lm(ModelConfig(task="causal-lm", name=str(p))) for p in paths]
    folders = [llm.model_folder(str(p)) for p in paths]
    made = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "home" / "models").iterdir()}
    again = llm.model_folder(str(paths[0]))
    # Assert: each file gives its own model's logits exactly (float32 in, float32 out), each has
    # its own plain folder (safetensors, no GGUF needed to reload it), and a second load reuses it
    with torch.no_grad():
        for want, got in zip(models, loaded):
            torch.testing.assert_close(got(input_ids=x).logits, want(input_ids=x).logits, rtol=0.0, atol=0.0)
    assert folders[0] != folders[1] and again == folders[0]
    assert all((f / "model.safetensors").exists() and (f / "config.json").exists() for f in folders)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "home" / "models").iterdir()} == made
    assert not [p for p in (tmp_path / "home" / "models").iterdir() if p.name.endswith(".tmp")]
    reloaded = llm.load_causal_lm(ModelConfig(task="causal-lm", name=str(folders[1])))  # the folder alone
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, models[1](input_ids=x).logits, rtol=0.0, atol=0.0)


def test_a_gguf_file_replaced_in_place_leaves_no_stale_folder_behind(tmp_path, monkeypatch):
    import os

    # Prepare: a file loaded once, another file of the same name loaded once, and a folder of
    # fedpeft's old size-only naming
    monkeypatch.setenv(llm.HOME_ENV, str(tmp_path / "home"))
    models = tmp_path / "home" / "models"
    paths = [tmp_path / f"hospital{i}" / "model.gguf" for i in (0, 1)]
    for i, path in enumerate(paths):
        torch.manual_seed(i)
        path.parent.mkdir()
        write_gguf(path, AutoModelForCausalLM.from_config(llm.tiny_config("tiny-llama", VOCAB)).eval())
    first, other = llm.model_folder(str(paths[0])), llm.model_folder(str(paths[1]))
    (models / "model-98362432-model").mkdir()
    (models / "model-98362432-model" / "model.safetensors").write_bytes(b"old")
    # Execute: the first file replaced in place by another model (a re-download), then loaded
    torch.manual_seed(2)
    replacement = AutoModelForCausalLM.from_config(llm.tiny_config("tiny-llama", VOCAB)).eval()
    write_gguf(paths[0], replacement)
    os.utime(paths[0], ns=(1, paths[0].stat().st_mtime_ns + 1))  # a distinct time, whatever the clock's grain
    loaded = llm.load_causal_lm(ModelConfig(task="causal-lm", name=str(paths[0])))
    now = llm.model_folder(str(paths[0]))
    # Assert: the replaced file's folder and the old-named one are gone; the other file's stays;
    # the new folder holds the new model
    assert now != first and not first.exists() and not (models / "model-98362432-model").exists()
    assert other.exists() and sorted(p.name for p in models.iterdir()) == sorted([now.name, other.name])
    x = torch.tensor([[1, 504, 215, 314, 870, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, replacement(input_ids=x).logits, rtol=0.0, atol=0.0)


def test_a_folder_found_made_records_its_file_and_old_named_folders_go_once_per_process(tmp_path, monkeypatch):
    # Prepare: a folder made before folders recorded their file, and one of fedpeft's old naming
    monkeypatch.setenv(llm.HOME_ENV, str(tmp_path / "home"))
    path = tmp_path / "model.gguf"
    torch.manual_seed(0)
    write_gguf(path, AutoModelForCausalLM.from_config(llm.tiny_config("tiny-llama", VOCAB)).eval())
    folder = llm.model_folder(str(path))
    (folder / llm.SOURCE).unlink()
    old = folder.parent / "model-98362432-model"
    old.mkdir()
    llm._prune_once.cache_clear()  # a new process
    # Execute: found, not made
    again = llm.model_folder(str(path))
    pruned = not old.exists()
    old.mkdir()  # an old folder appearing later in the same process is left to the next one
    llm.model_folder(str(path))
    # Assert
    st = path.stat()
    assert pruned and again == folder and json.loads((folder / llm.SOURCE).read_text()) == {
        "path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert old.exists() and sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, old.name])
    llm._prune_once.cache_clear()
    llm.model_folder(str(path))
    assert not old.exists()


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-mistral"])
def test_a_qwen2_or_mistral_gguf_file_loads_as_the_model_it_was_written_from(name, tmp_path, monkeypatch):
    # Prepare: a random model written as llama.cpp would (Qwen2 with its biases; Mistral as a
    # permuted "llama"), and an empty model cache
    monkeypatch.setenv(llm.HOME_ENV, str(tmp_path / "home"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llm.tiny_config(name, VOCAB)).eval()
    path = tmp_path / "model.gguf"
    write_gguf(path, model)
    # Execute
    loaded = llm.load_causal_lm(ModelConfig(task="causal-lm", name=str(path)))
    # Assert: the same logits to the bit. A GGUF file keeps no sliding window, so transformers loads
    # a Mistral as a full-attention Llama: the same model on prompts within the window (16 tokens
    # for tiny-mistral; 4,096 for Mistral 7B v0.1, none from v0.2 on), and fedpeft trains and
    # exports what it loaded
    x = torch.tensor([[1, 504, 215, 314, 870, 2] * (4 if name == "tiny-qwen2" else 2)])
    assert x.shape[1] <= (getattr(model.config, "sliding_window", None) or x.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0.0, atol=0.0)
    assert llm.model_type(str(path)) == ("qwen2" if name == "tiny-qwen2" else "llama")


def test_gguf_name_maps_are_shared_while_loading_and_the_library_is_restored_after():
    # Prepare
    import gguf

    from fedpeft.llm import shared_gguf_name_maps

    original = gguf.get_tensor_name_map
    arch = gguf.MODEL_ARCH.LLAMA

    # Execute
    with shared_gguf_name_maps():
        first, again = gguf.get_tensor_name_map(arch, 30), gguf.get_tensor_name_map(arch, 30)
        other = gguf.get_tensor_name_map(arch, 2)
    after = gguf.get_tensor_name_map(arch, 30)

    # Assert: one map per (architecture, blocks) inside, the same lookups as a fresh one, and
    # gguf's own function back afterwards
    assert first is again and other is not first
    assert first.get_name("blk.29.attn_q") == original(arch, 30).get_name("blk.29.attn_q") == "blk.29.attn_q"
    assert first.get_name("model.layers.29.self_attn.q_proj") == "blk.29.attn_q"
    assert other.get_name("model.layers.29.self_attn.q_proj") is None
    assert gguf.get_tensor_name_map is original and after is not first
