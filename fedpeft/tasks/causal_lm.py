"""Causal language modelling on prompt/response pairs: the loss covers the response tokens only,
logits are computed only at the positions that predict them, and held-out prompts are answered
by greedy generation for the answer-accuracy metric.

A prompt is a chat transcript (``fedpeft.data.instructions``), rendered through the tokenizer's
chat template (Alpaca's "### Instruction / ### Response" layout when it has none).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from torch.utils.data import TensorDataset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from fedpeft import llm, models
from fedpeft.config import AdapterConfig, ModelConfig
from fedpeft.methods.answer_head import head_logits
from fedpeft.prefix import PrefixDataset, layer_local, length_batches, trim
from fedpeft.tasks import frozen_kv
from fedpeft.tasks.base import Examples, Task
from fedpeft.tasks.token_ce import IGNORE, token_cross_entropy

LLAMA_LIKE = ("llama", "mistral", "qwen2", "gemma")  # decoders whose layers fedpeft can resume from cached states
DEFAULT_TARGETS = next(f.default for f in dataclasses.fields(AdapterConfig) if f.name == "target_modules")


def messages_of(prompt: str) -> list[dict[str, str]]:
    """A prompt as chat messages: a JSON list of {role, content} (what the loaders write), or plain text."""
    if prompt.startswith("["):
        try:
            msgs = json.loads(prompt)
        except json.JSONDecodeError:
            msgs = None
        if isinstance(msgs, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
            return msgs
    return [{"role": "user", "content": prompt}]


def render_prompt(tok: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model sees before its answer."""
    msgs = messages_of(prompt)
    if getattr(tok, "chat_template", None):
        return str(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    system = "".join(m["content"] + "\n\n" for m in msgs if m["role"] == "system")
    turns = "".join(f"### {'Instruction' if m['role'] == 'user' else 'Response'}:\n{m['content']}\n\n"
                    for m in msgs if m["role"] != "system")
    return f"{system}{turns}### Response:\n"


def answer_of(text: str) -> str:
    """The answer part of a response: its first clause, case-folded ("Cardiology. Chest pain..." ->
    "cardiology"; "B) aspirin" -> "b"), what exact-match and option accuracy compare."""
    return re.split(r"[.\n:;,)]", text.strip(), maxsplit=1)[0].strip().lower()


def body_of(model: nn.Module) -> tuple[Any, Any]:
    """(the causal LM under any peft wrapper, its decoder body)."""
    model = getattr(model, "_module", model)  # under an Opacus GradSampleModule
    base: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    return base, getattr(base, str(base.base_model_prefix))


def resumable(model: PreTrainedModel) -> bool:
    return getattr(model.config, "model_type", "") in LLAMA_LIKE


def layer_kinds(body: Any) -> list[str]:
    """Each decoder layer's attention: "full_attention", or "sliding_attention" (every Mistral layer
    when its config sets a window; the layers Qwen2's ``layer_types`` mark)."""
    cfg = body.config
    return list(getattr(cfg, "layer_types", None) or [
        "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"] * len(body.layers))


def layer_masks(body: Any, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> list[Any]:
    """Each decoder layer's attention mask, as the body's own forward builds it: causal, and within
    the window for a sliding-window layer (``layer_kinds``)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = body.config
    kinds = layer_kinds(body)
    made: dict[str, Any] = {}
    for kind in dict.fromkeys(kinds):
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        made[kind] = make(config=cfg, inputs_embeds=hidden, attention_mask=mask, cache=None, position_ids=pos)
    return [made[kind] for kind in kinds]


def run_layers(body: Any, hidden: torch.Tensor, mask: torch.Tensor, *, start: int, stop: int | None = None
               ) -> torch.Tensor:
    """Decoder layers ``start:`` and the final norm on cached states, as the body's own forward runs
    them (same causal masks, same rotary positions); with ``stop``, layers ``start:stop`` and no norm.
    Hand-written: transformers cannot start a forward at a middle layer."""
    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    masks = layer_masks(body, hidden, mask, pos)
    rope = body.rotary_emb(hidden, position_ids=pos)
    for i in range(start, len(body.layers) if stop is None else stop):
        out = body.layers[i](hidden, attention_mask=masks[i], position_embeddings=rope, position_ids=pos)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden if stop is not None else body.norm(hidden)


# decoder layers laid out as Llama's (pre-norm attention with rotary queries and keys, then a
# pre-norm MLP), whose attention ``last_layer_at`` can compute for a few queries
RESPONSE_ONLY_LAYERS = frozenset(f"transformers.models.{m}.modeling_{m}.{c}DecoderLayer" for m, c in (
    ("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"), ("gemma", "Gemma")))


def response_only_layer(body: Any) -> bool:
    """Whether ``last_layer_at`` can stand in for the last layer: a plain Llama-like layer, no
    attention dropout, no method inserted on the whole layer (LoReFT's hook would see every position)."""
    from fedpeft.methods.inserted import REFT

    layer = body.layers[-1]
    return f"{type(layer).__module__}.{type(layer).__qualname__}" in RESPONSE_ONLY_LAYERS \
        and float(getattr(layer.self_attn, "attention_dropout", 0.0)) == 0.0 and not hasattr(layer, REFT)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, *, scale: float
                      ) -> torch.Tensor:
    """Attention of a few queries (B, H, R, hd) over grouped keys and values (B, KV, T, hd), where
    ``allowed`` (B, R, T) says which keys each query sees; in float32 at least, as PyTorch's fused
    kernels accumulate, with each key head's query heads stacked instead of the keys repeated. At
    R ~ 10 the products are tiny; PyTorch's CPU flash kernel with a mask took ~0.15 s a step here."""
    b, h, r, hd = q.shape
    kv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        qg = q.to(acc).reshape(b, kv, (h // kv) * r, hd)  # query head j*G+g reads key head j (repeat_kv's order)
        scores = torch.matmul(qg, k.to(acc).transpose(-1, -2)) * scale  # (B, KV, G*R, T)
        scores = scores.masked_fill(~allowed.repeat(1, h // kv, 1).unsqueeze(1), float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1), v.to(acc))
    return out.reshape(b, h, r, hd).to(q.dtype)


def last_layer_at(body: Any, hidden: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
    """The last decoder layer and the final norm at positions ``pos`` (B, R) only, from its input
    ``hidden`` (B, T, d): keys and values over every token, queries, the output projection and the
    MLP only where a response token is predicted (~9 of a referral's ~70 positions). None where
    ``response_only_layer`` says no. Hand-written: transformers computes every position."""
    from transformers.models.llama.modeling_llama import rotate_half

    if not response_only_layer(body):
        return None
    layer = body.layers[-1]
    attn = layer.self_attn
    b, t, _ = hidden.shape
    cos, sin = body.rotary_emb(hidden, position_ids=torch.arange(t, device=hidden.device).unsqueeze(0))
    take = pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    resid = hidden.gather(1, take)  # (B, R, d)
    normed = layer.input_layernorm(hidden)
    hd = attn.head_dim
    q = attn.q_proj(normed.gather(1, take)).view(b, pos.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(normed).view(b, t, -1, hd).transpose(1, 2)
    v = attn.v_proj(normed).view(b, t, -1, hd).transpose(1, 2)
    cq, sq = cos[0][pos].unsqueeze(1), sin[0][pos].unsqueeze(1)  # (B, 1, R, hd)
    q = q * cq + rotate_half(q) * sq
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    keys = torch.arange(t, device=hidden.device)
    allowed = (keys.view(1, 1, t) <= pos.unsqueeze(-1)) & mask.bool().unsqueeze(1)  # causal, no padding
    if layer_kinds(body)[-1] == "sliding_attention":  # the window of transformers' sliding_window_overlay
        allowed &= keys.view(1, 1, t) > pos.unsqueeze(-1) - int(body.config.sliding_window)
    out = grouped_attention(q, k, v, allowed, scale=float(attn.scaling))
    h = resid + attn.o_proj(out.transpose(1, 2).reshape(b, pos.shape[1], -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return body.norm(h)


def shared_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens every row shares (real tokens, at least one left per row); 0 if few."""
    if len(ids) < 2:
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(0).long().cumprod(0)
    c = min(int(same.sum()), int(mask.sum(1).min()) - 1)
    return c if c >= 4 else 0


def response_positions(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols) of the positions that predict a response token, row-major as ``nonzero`` gives
    them, and the same positions padded per row: ``pos`` (B, R) and ``valid`` (B, R)."""
    sel = y[:, 1:] != IGNORE
    rows, cols = sel.nonzero(as_tuple=True)
    width = max(1, int(sel.sum(1).max())) if sel.numel() else 1
    rank = sel.long().cumsum(1) - 1
    pos = torch.zeros((y.shape[0], width), dtype=torch.long, device=y.device)
    valid = torch.zeros((y.shape[0], width), dtype=torch.bool, device=y.device)
    pos[rows, rank[rows, cols]] = cols
    valid[rows, rank[rows, cols]] = True
    return rows, cols, pos, valid


def virtual_token_hidden(model: PeftModel, body: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the real tokens behind a prompt-learning adapter's virtual tokens, as
    peft's forward places them (prompts before the embeddings; a prefix as past keys and values)."""
    from peft import PeftType

    cfg = model.active_peft_config
    n = int(cfg.num_virtual_tokens)
    full = torch.cat([torch.ones((x.shape[0], n), dtype=mask.dtype, device=mask.device), mask], dim=1)
    if cfg.peft_type == PeftType.PREFIX_TUNING:
        return body(input_ids=x, attention_mask=full, past_key_values=model.get_prompt(x.shape[0])).last_hidden_state
    embeds = body.get_input_embeddings()(x)
    prompts = model.get_prompt(x.shape[0]).to(embeds.dtype)
    return body(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=full).last_hidden_state[:, n:]


def head_rows(device: torch.device, precision: str) -> int:
    """Rows the LM head's input is padded to a multiple of. With bfloat16 on a CPU, oneDNN compiles a
    kernel for each new matrix shape (10-15 ms more for the 49k-token head: twice the product's time),
    and a batch's count of response tokens is new at almost every step: rounded up to 16 (at most 15
    zero rows), the shapes repeat. Float32 (MKL) and CUDA compile nothing: no padding."""
    return 16 if device.type == "cpu" and models.resolve_precision(precision, device) == "bfloat16" else 1


class CausalLM(Task):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    metric_label = "answer accuracy (greedy generation, exact match of the answer)"
    response_only = True  # on cached states, the last layer runs only where a response token is predicted

    def load_model(self, cfg: ModelConfig, labels: list[str]) -> PreTrainedModel:
        return llm.load_causal_lm(cfg)

    def tokenizer(self, cfg: ModelConfig) -> PreTrainedTokenizerBase:
        return llm.load_tokenizer(cfg.name)

    def lora_targets(self, model_cfg: ModelConfig, adapter: AdapterConfig) -> list[str] | None:
        """The run's modules, or with the (classification) default peft's own per-architecture choice
        (q_proj/v_proj for Llama, c_attn for GPT-2)."""
        return None if adapter.target_modules == DEFAULT_TARGETS else adapter.target_module_list

    def encode(self, cfg: ModelConfig, examples: Examples) -> TensorDataset:
        """(ids, mask, labels): labels are the ids on response tokens (the eos included, so the model
        learns to stop) and IGNORE on the prompt and padding. Too long: the prompt's start goes first."""
        tok = self.tokenizer(cfg)
        if len(examples.targets) != len(examples.texts):
            raise ValueError(f"causal-lm needs one response per prompt: {len(examples.texts)} prompts, "
                             f"{len(examples.targets)} responses")
        rows: list[tuple[list[int], list[int]]] = []
        eos = tok.eos_token or ""
        for prompt, response in zip(examples.texts, examples.targets):
            p = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
            r = tok(response + eos, add_special_tokens=False)["input_ids"][: max(1, cfg.max_length - 8)]
            p = p[max(0, len(p) + len(r) - cfg.max_length):]
            rows.append((p, r))
        width = max((len(p) + len(r) for p, r in rows), default=1)
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            mask[i, :n] = 1
            labels[i, len(p):n] = torch.tensor(r)
        return TensorDataset(ids, mask, labels)

    def hidden(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor, start: Mapping[str, Any]) -> torch.Tensor:
        """Final hidden states (after the last norm), from token ids or from cached states."""
        base, body = body_of(model)
        if start:
            return run_layers(body, x.to(base.dtype), mask, start=int(start["start_layer"]))
        peft_model = getattr(model, "_module", model)
        if isinstance(peft_model, PeftModel) and peft_model.active_peft_config.is_prompt_learning:
            return virtual_token_hidden(peft_model, body, x, mask)
        return body(input_ids=x, attention_mask=mask).last_hidden_state

    def token_losses(self, model: nn.Module, batch: Sequence[torch.Tensor], *, device: torch.device,
                     start: Mapping[str, Any], precision: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss of each response token, its row, batch size). The LM head runs only at the positions
        that predict a response token: over SmolLM2's 49k-token vocabulary it would otherwise cost as
        much as the adapted layers."""
        x, mask, y = (t.to(device) for t in batch)
        x, mask = trim(x, mask)
        y = y[:, : mask.shape[1]]
        base, body = body_of(model)
        rows, cols, pos, valid = response_positions(y)
        with models.autocast(device, precision):
            picked = None
            index: tuple[torch.Tensor, ...]
            if start and self.response_only and response_only_layer(body):  # the last layer only where it is read
                h = x.to(base.dtype)
                if int(start["start_layer"]) < len(body.layers) - 1:
                    h = run_layers(body, h, mask, start=int(start["start_layer"]), stop=len(body.layers) - 1)
                out = last_layer_at(body, h, mask, pos)
                if out is not None:
                    states, index = out, (valid,)
                    picked = out[valid]
            if picked is None:
                states = self.hidden(model, x, mask, start)
                index = (rows, cols)
                picked = states[rows, cols]
            target = y[rows, cols + 1]
            n_picked = picked.shape[0]
            spare = -n_picked % head_rows(device, precision)
            if spare:  # zero rows with ignored targets: their loss is 0 and no gradient reaches them
                picked = torch.cat([picked, picked.new_zeros((spare, picked.shape[1]))])
                target = torch.cat([target, target.new_full((spare,), IGNORE)])
            # the answer head (if any) runs on the states with their batch dimension, for Opacus
            logits = head_logits(base.get_output_embeddings(), picked, states, index)
        # float32 at least (autocast's bfloat16 logits), float64 kept (the exactness tests); the
        # padding is cut from the per-token losses, not from the logits (whose slice's backward
        # would write a zero tensor as wide as the vocabulary)
        ce = token_cross_entropy(logits, target)[:n_picked]
        return ce, rows, int(x.shape[0])

    def per_example_loss(self, model: nn.Module, batch: Sequence[torch.Tensor], *, device: torch.device,
                         start: Mapping[str, Any], precision: str) -> torch.Tensor:
        """Mean loss over each example's response tokens (one record, one number)."""
        ce, rows, n = self.token_losses(model, batch, device=device, start=start, precision=precision)
        total = torch.zeros(n, device=ce.device, dtype=ce.dtype).index_add(0, rows, ce)
        count = torch.zeros(n, device=ce.device, dtype=ce.dtype).index_add(0, rows, torch.ones_like(ce))
        return total / count.clamp(min=1.0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TensorDataset, *, device: torch.device, precision: str,
                 num_labels: int, cfg: ModelConfig | None = None) -> dict[str, float]:
        """Token-level loss and perplexity over every example; answer accuracy by greedy generation
        on the first ``eval-generations`` prompts."""
        if len(data) == 0:
            return {**self.empty_metrics(), "perplexity": float("nan")}
        cfg = cfg or ModelConfig(task=self.name, name="tiny-llama")
        model.to(device).eval()
        start = ({"start_layer": data.start_layer} if isinstance(data, PrefixDataset) else {})
        x_all, mask_all, y_all = data.tensors
        nll, tokens = 0.0, 0
        for idx in length_batches(mask_all, 64):
            ce, _, _ = self.token_losses(model, (x_all[idx], mask_all[idx], y_all[idx]), device=device,
                                         start=start, precision=precision)
            nll += float(ce.sum())
            tokens += int(ce.numel())
        loss = nll / max(tokens, 1)
        ids = data.ids if isinstance(data, PrefixDataset) and data.ids is not None else x_all
        k = len(data) if cfg.eval_generations == 0 else min(cfg.eval_generations, len(data))
        kept = data if isinstance(data, PrefixDataset) and data.ids is not None else None  # frozen layers kept
        answers = self.generate_rows(model, ids[:k], y_all[:k], cfg, device=device, precision=precision,
                                     memo=kept.memo if kept else None, start=kept.start_layer if kept else 0)
        refs = [self.tokenizer(cfg).decode(r[r != IGNORE], skip_special_tokens=True) for r in y_all[:k]]
        hits = [answer_of(a) == answer_of(r) for a, r in zip(answers, refs)]
        return {"accuracy": sum(hits) / max(len(hits), 1), "loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "examples": float(len(data)), "generated": float(len(hits))}

    def generate_rows(self, model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, cfg: ModelConfig, *,
                      device: torch.device, precision: str, batch_size: int = 64,
                      memo: dict[Any, Any] | None = None, start: int = 0) -> list[str]:
        """Greedy answers to the prompt part (the tokens before the response) of each row."""
        prompts = [row[: int((lab != IGNORE).nonzero()[0])] if (lab != IGNORE).any() else row
                   for row, lab in zip(ids, labels)]
        return self.generate(model, prompts, cfg, device=device, precision=precision, batch_size=batch_size,
                             memo=memo, start=start)

    def generate(self, model: nn.Module, prompts: Sequence[torch.Tensor], cfg: ModelConfig, *, device: torch.device,
                 precision: str, batch_size: int = 64, max_new_tokens: int | None = None,
                 memo: dict[Any, Any] | None = None, start: int = 0) -> list[str]:
        """Greedy answers. With ``memo`` and ``start`` (the first adapted layer; every layer below it
        frozen), the prompts' keys and values in layers ``:start`` are kept in ``memo`` on first use
        and reused by later calls on the same prompts (``frozen_kv``)."""
        tok = self.tokenizer(cfg)
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        gen = GenerationConfig(max_new_tokens=max_new_tokens or cfg.max_new_tokens, do_sample=False,
                               pad_token_id=pad, eos_token_id=tok.eos_token_id)
        out: list[str] = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad least
        base, body = body_of(model)
        kept = memo if memo is not None and resumable(base) else None
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = max(len(prompts[i]) for i in idx)
            x = torch.full((len(idx), width), pad, dtype=torch.long)
            m = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                n = len(prompts[i])
                x[j, width - n:] = prompts[i]
                m[j, width - n:] = 1
            generate: Any = model.generate
            x, m = x.to(device), m.to(device)
            with models.autocast(device, precision):
                extra = {} if kept is None else frozen_kv.generate_kwargs(
                    body, kept, (frozen_kv.batch_key(x, m), str(device), precision, start), x, m, start=start)
                new = generate(input_ids=x, attention_mask=m, generation_config=gen, **extra)
            for j, i in enumerate(idx):
                out[i] = tok.decode(new[j, width:], skip_special_tokens=True)
        return out

    def prefix_start(self, model_cfg: ModelConfig, adapter: AdapterConfig) -> int:
        layers = adapter.layer_list
        if not layers or not layer_local(adapter.method) or llm.model_type(model_cfg.name) not in LLAMA_LIKE:
            return 0
        return min(layers)

    @torch.no_grad()
    def compute_prefix(self, model: nn.Module, data: TensorDataset, *, start_layer: int, ffn_start: bool,
                       precision: str) -> TensorDataset:
        """The input of layer ``start_layer`` for every example, once (the frozen layers below it)."""
        import copy

        ids, mask, labels = data.tensors
        base, body = body_of(model)
        device = next(base.parameters()).device
        dtype = getattr(torch, models.resolve_precision(precision, device))
        width = int(base.config.hidden_size)
        hidden = torch.zeros((len(ids), ids.shape[1], width), dtype=dtype)
        # The tokens every row starts with (the chat template's system turn, ~1/3 of a referral) run
        # once; each batch continues from their keys and values (causal attention: the same states).
        c = shared_prefix(ids, mask) if resumable(base) else 0
        cache = None
        if c:
            with models.autocast(device, precision):
                out = body(input_ids=ids[:1, :c].to(device), use_cache=True, output_hidden_states=True)
            hidden[:, :c] = out.hidden_states[start_layer][0].to("cpu", dtype)
            cache = out.cache
        for idx in length_batches(mask, 32):
            b_ids, b_mask = trim(ids[idx], mask[idx])
            kw: dict[str, Any] = {}
            if cache is not None:
                kw["cache"] = copy.deepcopy(cache)
                kw["cache"].batch_repeat_interleave(len(idx))
            with models.autocast(device, precision):
                out = body(input_ids=b_ids[:, c:].to(device), attention_mask=b_mask.to(device),
                           output_hidden_states=True, use_cache=cache is not None, **kw)
            hidden[idx, c: b_ids.shape[1]] = out.hidden_states[start_layer].to("cpu", dtype)
        return PrefixDataset(hidden, mask, labels, start_layer=start_layer, ids=ids)
