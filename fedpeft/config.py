"""Typed configuration: dataclasses with help text and validation. ``fedpeft.runconfig`` is the
one place that turns Flower's flat kebab-case run config into them (it imports this module; this
module imports nothing of fedpeft)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "ModelConfig",
    "AdapterConfig",
    "PrivacyConfig",
    "TrainConfig",
    "DataConfig",
    "FederationConfig",
    "RunConfig",
    "SECTIONS",
    "bad",
]


PRECISIONS = ("auto", "float32", "bfloat16")
TASK_NAMES = ("classification", "causal-lm")  # fedpeft.tasks registers one class for each
METHOD_NAMES = ("lora", "dora", "ia3", "bitfit", "prompt", "p-tuning", "prefix", "bottleneck", "loreft")  # fedpeft.methods: one entry each
ENCODERS = ("minilm", "tiny")  # embedded / random BERT encoders (classification)
# random causal LMs for tests, and their transformers model type: the architectures causal-lm names
TINY_DECODERS = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-qwen2": "qwen2", "tiny-mistral": "mistral",
                 "tiny-gemma": "gemma"}
DECODERS = ("smollm2", *TINY_DECODERS)  # embedded / random causal LMs (causal-lm)
SYNTHETIC = {"notes": "classification", "referrals": "causal-lm"}  # embedded generators and their task
DP_NOISE = ("secret", "seeded")


def default_choices(source: str) -> list[str]:
    """The answers a response starts with, for a built-in calibration source of the answer head
    (here, torch-free: a ClientApp validates its run config before it imports the model stack)."""
    if source == "referrals":
        from fedpeft.data.notes import LABELS

        return [label.capitalize() for label in LABELS]  # as fedpeft.data.instructions.referral_response writes them
    return []


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def bad(field_name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{field_name}={value!r}: {why}")


def _help(text: str, key: str) -> dict[str, str]:
    return {"help": text, "key": key}


@dataclass
class ModelConfig:
    task: str = field(default="classification", metadata=_help(
        "'classification' (a sequence classifier over notes) or 'causal-lm' (generative fine-tuning of a causal "
        "language model on prompt/response pairs; the loss covers the response tokens only)", "task"))
    name: str = field(
        default="minilm",
        metadata=_help("classification: 'minilm' (embedded all-MiniLM-L6-v2), 'tiny' (random tiny BERT for tests); "
                       "causal-lm: 'smollm2' (embedded SmolLM2-135M-Instruct), 'tiny-llama' / 'tiny-gpt2' / 'tiny-qwen2' / "
                       "'tiny-mistral' / 'tiny-gemma' (random, for tests); or a local model folder, or a .gguf file", "model"),
    )
    max_length: int = field(default=64, metadata=_help(
        "tokens per note (classification) or per prompt + response (causal-lm; the prompt's start is cut first)",
        "max-length"))
    seed: int = field(default=0, metadata=_help("seed for randomly initialised weights (tiny model, head)", "model-seed"))
    pooling: str = field(default="mean", metadata=_help(
        "'mean' (masked mean of token states, as sentence-transformers trained MiniLM) or 'cls' "
        "(transformers' standard [CLS] pooler classifier)", "pooling"))
    layers: int = field(default=0, metadata=_help("keep only the first N encoder layers (0 = all): a small, "
                                                  "still pretrained model for smoke runs", "model-layers"))
    head_init: str = field(default="label-names", metadata=_help(
        "'label-names' (zero-shot head: each class row is the encoder's embedding of head-template "
        "filled with the label name; public, so it costs no privacy) or 'random'", "head-init"))
    head_template: str = field(default="a clinical note from {label}", metadata=_help(
        "text embedded per class for head-init='label-names'; must contain {label}", "head-template"))
    dropout: float = field(default=0.0, metadata=_help(
        "dropout of the encoder's hidden states and attention probabilities and before the head, "
        "while training (BERT's own is 0.1; off by default: it cost 8 % of a training step and moved "
        "neither DP nor non-DP accuracy on the hospitals preset)", "model-dropout"))
    precision: str = field(default="auto", metadata=_help(
        "compute dtype of the model's matmuls (autocast): 'auto' (bfloat16 where the device computes it "
        "natively: CUDA GPUs from Ampere on, x86 CPUs with AVX512-BF16 or AMX; float32 elsewhere), "
        "'bfloat16' or 'float32'; adapter weights, optimizer state, per-sample clipping and DP noise "
        "stay float32 either way", "precision"))
    max_new_tokens: int = field(default=24, metadata=_help(
        "causal-lm: tokens generated (greedy) per held-out prompt for the answer-accuracy metric", "max-new-tokens"))
    eval_generations: int = field(default=64, metadata=_help(
        "causal-lm: held-out prompts answered by greedy generation per evaluation (the loss and perplexity "
        "use every example); 0 = all", "eval-generations"))

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise bad("task", self.task, f"must be one of {', '.join(TASK_NAMES)}")
        if self.task == "causal-lm" and self.name in ENCODERS:
            raise bad("model", self.name, f"is a BERT encoder; task='causal-lm' needs {', '.join(DECODERS)}, "
                      "a causal LM folder or a .gguf file")
        if self.task == "classification" and self.name in DECODERS:
            raise bad("model", self.name, "is a causal LM; use it with task='causal-lm'")
        if self.max_new_tokens < 1:
            raise bad("max-new-tokens", self.max_new_tokens, "must be >= 1")
        if self.eval_generations < 0:
            raise bad("eval-generations", self.eval_generations, "must be >= 0 (0 = all)")
        if self.pooling not in ("mean", "cls"):
            raise bad("pooling", self.pooling, "must be 'mean' or 'cls'")
        if self.layers < 0:
            raise bad("model-layers", self.layers, "must be >= 0")
        if not self.name:
            raise bad("model", self.name, "must name 'minilm', 'tiny' or a model path")
        if self.max_length < 8:
            raise bad("max-length", self.max_length, "must be >= 8")
        if self.head_init not in ("label-names", "random"):
            raise bad("head-init", self.head_init, "must be 'label-names' or 'random'")
        if self.head_init == "label-names" and self.pooling != "mean" and self.task == "classification":
            raise ConfigError(f"head-init={self.head_init!r} needs pooling='mean'; got pooling={self.pooling!r} "
                              "(set head-init='random')")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("model-dropout", self.dropout, "must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise bad("precision", self.precision, f"must be one of {', '.join(PRECISIONS)}")
        if "{label}" not in self.head_template:
            raise bad("head-template", self.head_template, "must contain {label}")


@dataclass
class AdapterConfig:
    method: str = field(default="lora", metadata=_help(
        "PEFT method: " + ", ".join(repr(m) for m in METHOD_NAMES),
        "adapter"))
    rank: int = field(default=8, metadata=_help("LoRA rank r", "lora-rank"))
    alpha: float = field(default=16.0, metadata=_help("LoRA scaling alpha", "lora-alpha"))
    dropout: float = field(default=0.0, metadata=_help("LoRA dropout", "lora-dropout"))
    target_modules: str = field(default="query,key,value", metadata=_help(
        "comma-separated module names (attention query, key and value by default)", "lora-target-modules"))
    layers: str = field(default="5", metadata=_help("comma-separated layer indices to adapt ('' = all); "
                        "MiniLM's top layer by default: the frozen layers below it run once per note set "
                        "(fedpeft.prefix) and backward stops there", "lora-layers"))
    virtual_tokens: int = field(default=8, metadata=_help(
        "virtual tokens of adapter='prompt', 'p-tuning' or 'prefix'", "virtual-tokens"))
    use_rslora: bool = field(default=False, metadata=_help("rank-stabilised LoRA scaling alpha/sqrt(r)", "rslora"))
    ranks: str = field(default="", metadata=_help(
        "per-site LoRA ranks, e.g. '4,8,16,32': site k trains rank ranks[k mod n] (cycling; a deployed "
        "site may set its own with node config lora-rank, which must be one of them); '' = every site "
        "trains lora-rank. Mixed ranks need a rank merge rule (merge=zero_pad|svd|stack|frozen_a)", "lora-ranks"))
    answer_head: bool = field(default=False, metadata=_help(
        "causal-lm with adapter='lora': also train the whitened answer head, a LoRA on lm_head that reads the "
        "answer choices' first tokens out of the final state in coordinates centred and scaled by public "
        "statistics (fedpeft.methods.answer_head); saved as plain PEFT", "answer-head"))
    answer_choices: str = field(default="", metadata=_help(
        "comma-separated answers a response starts with, as written (e.g. 'A,B,C,D'); '' = the calibration "
        "generator's (referrals: the seven specialties)", "answer-choices"))
    answer_head_calibration: str = field(default="referrals", metadata=_help(
        "public prompts for the answer head's statistics, the same for every party: 'referrals' (the "
        "embedded generator with a seed no site uses) or a JSONL/CSV instruction file none of the sites holds",
        "answer-head-calibration"))
    answer_head_recentre: int = field(default=64, metadata=_help(
        "with answer-head=true: public calibration prompts on which the server recentres the final adapter's "
        "choices (their mean logits made equal; post-processing with public data, epsilon unchanged); 0 = off",
        "answer-head-recentre"))

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise bad("adapter", self.method, f"must be one of {', '.join(METHOD_NAMES)}")
        if self.rank < 1:
            raise bad("lora-rank", self.rank, "must be >= 1")
        if self.alpha <= 0:
            raise bad("lora-alpha", self.alpha, "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("lora-dropout", self.dropout, "must be in [0, 1)")
        if self.virtual_tokens < 1:
            raise bad("virtual-tokens", self.virtual_tokens, "must be >= 1")
        if self.method in ("lora", "dora") and not self.target_module_list:
            raise bad("lora-target-modules", self.target_modules, "must name at least one module")
        try:
            _ = self.layer_list  # parsing is the check
        except ValueError:
            raise bad("lora-layers", self.layers, "must be comma-separated integers") from None
        try:
            ranks = self.rank_list
        except ValueError:
            raise bad("lora-ranks", self.ranks, "must be comma-separated integers") from None
        if any(r < 1 for r in ranks):
            raise bad("lora-ranks", self.ranks, "every rank must be >= 1")
        if self.answer_head and self.method != "lora":
            raise bad("answer-head", self.answer_head, f"is a LoRA on lm_head beside adapter='lora'; "
                      f"adapter={self.method!r} has no LoRA")
        if self.answer_head_recentre < 0:
            raise bad("answer-head-recentre", self.answer_head_recentre, "must be >= 0 (0 = off)")
        if self.answer_head and not self.answer_choice_list:
            raise bad("answer-choices", self.answer_choices, f"answer-head=true needs the choices: "
                      f"answer-head-calibration={self.answer_head_calibration!r} has no built-in list")

    @property
    def rank_list(self) -> list[int]:
        """Per-site ranks (cycled over sites); [rank] when lora-ranks is empty."""
        parts = [p.strip() for p in str(self.ranks).split(",") if p.strip()]
        return [int(p) for p in parts] or [self.rank]

    @property
    def max_rank(self) -> int:
        return max(self.rank_list)

    @property
    def answer_choice_list(self) -> list[str]:
        given = [c.strip() for c in self.answer_choices.split(",") if c.strip()]
        return given or default_choices(self.answer_head_calibration)

    @property
    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def layer_list(self) -> list[int] | None:
        parts = [p.strip() for p in str(self.layers).split(",") if p.strip()]
        return [int(p) for p in parts] or None


@dataclass
class PrivacyConfig:
    enabled: bool = field(default=True, metadata=_help("train with DP-SGD (Opacus)", "dp"))
    target_epsilon: float = field(default=8.0, metadata=_help("per-site epsilon for the whole planned training", "target-epsilon"))
    target_delta: float = field(default=1e-5, metadata=_help("per-site delta", "target-delta"))
    max_grad_norm: float = field(default=1.0, metadata=_help("per-sample clipping norm C", "max-grad-norm"))
    accountant: str = field(default="rdp", metadata=_help("Opacus accountant: 'rdp' or 'prv'", "accountant"))
    grad_sample_mode: str = field(default="hooks", metadata=_help("Opacus per-sample-gradient mode", "grad-sample-mode"))
    noise: str = field(default="secret", metadata=_help(
        "source of DP noise and Poisson sampling: 'secret' (each site seeds them from the operating "
        "system's entropy, never sent anywhere) or 'seeded' (from the run seed, site and round: "
        "reproducible by anyone with the run seed, so no protection against the coordinator; for "
        "simulations only, refused by a deployed site)", "dp-noise"))
    planned_rounds: int = field(default=0, metadata=_help(
        "rounds this site plans to train (sigma is calibrated so that many rounds spend exactly the "
        "budget); 0 = every round of the run. Asked for more, the site declines once another round "
        "would exceed target-epsilon", "dp-planned-rounds"))
    audit_canaries: int = field(default=0, metadata=_help(
        "simulations only: gradient canaries per site inside its real DP training, for `fedpeft audit "
        "--empirical` (0 = none; e.g. 1000)", "audit-canaries"))
    client_dp: bool = field(default=False, metadata=_help(
        "client-level DP on the server as well: each site's whole delta clipped to client-dp-clip, Gaussian "
        "noise added to their sum (protects one whole site, not just one record; needs merge='fedavg')",
        "client-dp"))
    client_noise_multiplier: float = field(default=1.0, metadata=_help(
        "client-level DP noise multiplier sigma (noise std = sigma x client-dp-clip on the sum)",
        "client-dp-noise-multiplier"))
    client_clip: float = field(default=1.0, metadata=_help("client-level DP: L2 clip of each site's delta",
                                                            "client-dp-clip"))
    client_max_epsilon: float = field(default=0.0, metadata=_help(
        "client-level epsilon budget at target-delta; a round that would exceed it is skipped (0 = none)",
        "client-dp-max-epsilon"))
    head_clip_share: float = field(default=0.5, metadata=_help(
        "with answer-head=true: the answer head's share of max-grad-norm squared (Opacus' per-layer clipping; "
        "the other tensors split the rest evenly). The norms' root sum of squares is max-grad-norm, so one "
        "record's gradient is bounded as before: same noise, same epsilon", "answer-head-clip-share"))

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise bad("target-epsilon", self.target_epsilon, "must be > 0")
        if not 0.0 < self.target_delta < 1.0:
            raise bad("target-delta", self.target_delta, "must be in (0, 1)")
        if not self.max_grad_norm > 0:
            raise bad("max-grad-norm", self.max_grad_norm, "must be > 0")
        if self.accountant not in ("rdp", "prv"):
            raise bad("accountant", self.accountant, "must be 'rdp' or 'prv'")
        if self.grad_sample_mode not in ("hooks", "functorch", "ew", "ghost"):
            raise bad("grad-sample-mode", self.grad_sample_mode, "must be hooks, functorch, ew or ghost")
        if self.audit_canaries < 0:
            raise bad("audit-canaries", self.audit_canaries, "must be >= 0")
        if not self.client_noise_multiplier > 0:
            raise bad("client-dp-noise-multiplier", self.client_noise_multiplier, "must be > 0")
        if not self.client_clip > 0:
            raise bad("client-dp-clip", self.client_clip, "must be > 0")
        if self.client_max_epsilon < 0:
            raise bad("client-dp-max-epsilon", self.client_max_epsilon, "must be >= 0 (0 = no limit)")
        if self.planned_rounds < 0:
            raise bad("dp-planned-rounds", self.planned_rounds, "must be >= 0 (0 = every round)")
        if not 0.0 < self.head_clip_share < 1.0:
            raise bad("answer-head-clip-share", self.head_clip_share, "must be in (0, 1)")
        if self.noise not in DP_NOISE:
            raise bad("dp-noise", self.noise, f"must be one of {', '.join(DP_NOISE)}")


@dataclass
class TrainConfig:
    optimizer: str = field(default="adamw", metadata=_help("local optimizer: 'adamw' or 'sgd' (momentum 0.9)", "optimizer"))
    lr: float = field(default=0.1, metadata=_help("local learning rate of the head (DP wants it large)", "lr"))
    adapter_lr_scale: float = field(default=0.1, metadata=_help(
        "adapter (LoRA) learning rate = lr x this; the head keeps lr. Under DP a smaller value keeps "
        "noise from eroding pretrained features while the head learns", "adapter-lr-scale"))
    batch_size: int = field(default=600, metadata=_help("expected (Poisson) batch size; large batches cut DP noise per step", "batch-size"))
    local_epochs: int = field(default=1, metadata=_help("local epochs per round", "local-epochs"))
    local_steps: int = field(default=0, metadata=_help(
        "optimizer steps per round instead of whole epochs (0 = local-epochs passes). Fewer steps than a pass "
        "over more notes keep the work per round while each note is sampled at a lower rate, which under DP "
        "buys a smaller noise multiplier (privacy amplification by subsampling)", "local-steps"))
    max_physical_batch_size: int = field(default=0, metadata=_help(
        "notes per forward pass: a batch is split, shortest notes together, into passes of at most "
        "this many (same gradients, less padding and memory; Opacus' BatchMemoryManager idea); "
        "0 = auto: the whole batch on a GPU, 128 on a CPU", "max-physical-batch-size"))
    proximal_mu: float = field(default=0.0, metadata=_help("FedProx proximal weight (0 = off)", "proximal-mu"))
    seed: int = field(default=0, metadata=_help(
        "run seed: data generation and order; also DP noise and sampling only with dp-noise='seeded'", "seed"))

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise bad("optimizer", self.optimizer, "must be 'adamw' or 'sgd'")
        if not self.lr > 0:
            raise bad("lr", self.lr, "must be > 0")
        if not self.adapter_lr_scale > 0:
            raise bad("adapter-lr-scale", self.adapter_lr_scale, "must be > 0")
        if self.batch_size < 1:
            raise bad("batch-size", self.batch_size, "must be >= 1")
        if self.local_epochs < 1:
            raise bad("local-epochs", self.local_epochs, "must be >= 1")
        if self.local_steps < 0:
            raise bad("local-steps", self.local_steps, "must be >= 0 (0 = local-epochs passes)")
        if self.max_physical_batch_size < 0:
            raise bad("max-physical-batch-size", self.max_physical_batch_size, "must be >= 0 (0 = auto)")
        if self.proximal_mu < 0:
            raise bad("proximal-mu", self.proximal_mu, "must be >= 0")


@dataclass
class DataConfig:
    source: str = field(default="notes", metadata=_help(
        "'notes' (embedded note generator, classification), 'referrals' (embedded referral-letter generator: "
        "note -> specialty and a one-sentence reason, causal-lm), or a CSV/JSONL/datasets path ('{site}' in it: "
        "one file per site). causal-lm files hold instruction/input/output (Alpaca) or chat 'messages' rows",
        "data"))
    notes_per_site: int = field(default=1800, metadata=_help("mean training notes per site (generator)", "notes-per-site"))
    test_per_site: int = field(default=40, metadata=_help("held-out notes per site (generator)", "test-per-site"))
    global_test_size: int = field(default=1000, metadata=_help("server-side global test notes", "global-test-size"))
    dirichlet_alpha: float = field(default=1.0, metadata=_help("label skew: Dirichlet alpha (small = skewed)", "dirichlet-alpha"))
    quantity_skew: float = field(default=0.5, metadata=_help("sigma of log-normal site sizes (0 = equal)", "quantity-skew"))
    label_noise: float = field(default=0.06, metadata=_help("fraction of flipped labels", "label-noise"))
    text_column: str = field(default="text", metadata=_help("text column/field of site files", "text-column"))
    label_column: str = field(default="label", metadata=_help("label column/field of site files", "label-column"))
    labels: str = field(default="", metadata=_help("comma-separated class names shared by all sites ('' = generator's)", "labels"))

    def __post_init__(self) -> None:
        if self.notes_per_site < 1:
            raise bad("notes-per-site", self.notes_per_site, "must be >= 1")
        if self.test_per_site < 0:
            raise bad("test-per-site", self.test_per_site, "must be >= 0")
        if self.global_test_size < 1:
            raise bad("global-test-size", self.global_test_size, "must be >= 1")
        if not self.dirichlet_alpha > 0:
            raise bad("dirichlet-alpha", self.dirichlet_alpha, "must be > 0")
        if self.quantity_skew < 0:
            raise bad("quantity-skew", self.quantity_skew, "must be >= 0")
        if not 0.0 <= self.label_noise < 1.0:
            raise bad("label-noise", self.label_noise, "must be in [0, 1)")

    @property
    def label_list(self) -> list[str]:
        from fedpeft.data.notes import LABELS

        given = [x.strip() for x in self.labels.split(",") if x.strip()]
        return given or (list(LABELS) if self.source in SYNTHETIC else [])


@dataclass
class FederationConfig:
    num_sites: int = field(default=4, metadata=_help("virtual sites (SuperNodes) in a simulation", "num-sites"))
    num_rounds: int = field(default=5, metadata=_help("server rounds", "num-server-rounds"))
    fraction_train: float = field(default=1.0, metadata=_help("fraction of sites sampled per round", "fraction-train"))
    fraction_evaluate: float = field(default=1.0, metadata=_help("fraction of sites for federated eval", "fraction-evaluate"))
    sites_per_round: int = field(default=0, metadata=_help(
        "sites sampled per round for training and for federated evaluation, whatever num-sites is "
        "(cross-device runs: 20 of 100,000); 0: fraction-train and fraction-evaluate decide", "sites-per-round"))
    min_train_sites: int = field(default=2, metadata=_help("fewest valid replies that make a round", "min-train-sites"))
    strategy: str = field(default="fedavg", metadata=_help("Flower strategy: fedavg, fedprox, fedadam, fedyogi, fedadagrad", "strategy"))
    merge: str = field(default="fedavg", metadata=_help(
        "merge rule: 'fedavg' (weighted mean of deltas; equal ranks), a robust rule for equal ranks "
        "('median', 'trimmed_mean', 'norm_bound'), or a heterogeneous-rank rule: 'zero_pad' (HetLoRA), "
        "'svd' (FlexLoRA/HLoRA), 'stack' (FLoRA), 'frozen_a' (FFA-LoRA, nested)", "merge"))
    robust: str = field(default="none", metadata=_help(
        "robust reduction composed with a rank rule: 'median' or 'trimmed_mean' replace the weighted mean of "
        "zero_pad, frozen_a or svd; 'norm_bound' bounds each site's update first (any rank rule). With equal "
        "ranks use merge='median' etc. directly", "robust"))
    server_lr: float = field(default=1e-2, metadata=_help("server learning rate (FedAdam/FedYogi/FedAdagrad eta)", "server-lr"))
    client_cpus: float = field(default=1.0, metadata=_help("CPUs per virtual client (Ray)", "client-cpus"))
    client_gpus: float = field(default=-1.0, metadata=_help(
        "GPUs per virtual client (Ray; fractions share one); -1: an equal share of this machine's GPU, "
        "none without one", "client-gpus"))
    out_dir: str = field(default="runs/latest", metadata=_help("where metrics, adapter and plots go", "out-dir"))
    resume: bool = field(default=False, metadata=_help(
        "continue the run in out-dir after its last complete round (server-state.json) instead of "
        "starting over", "resume"))
    round_timeout: float = field(default=0.0, metadata=_help(
        "seconds the server waits for a round's replies before merging what arrived (0 = 24 hours: every wait ends)",
        "round-timeout"))
    round_retries: int = field(default=0, metadata=_help(
        "when a round has fewer than min-train-sites good replies, ask the sites without one again this "
        "many times before skipping the round (a site resends a release it already made)", "round-retries"))
    fault_crash: float = field(default=0.0, metadata=_help(
        "simulations only: fraction of sites that crash in each round after their first DP step (fault "
        "injection; chosen from the run seed, site and round)", "fault-crash"))
    fault_late: float = field(default=0.0, metadata=_help(
        "simulations only: fraction of sites that answer fault-late-seconds late in each round", "fault-late"))
    fault_late_seconds: float = field(default=30.0, metadata=_help(
        "simulations only: how late a late site answers", "fault-late-seconds"))
    fault_hang: float = field(default=0.0, metadata=_help(
        "simulations only: fraction of sites that hang after their first DP step in each round, silent for "
        "fault-hang-seconds and then gone without a reply (needs round-timeout)", "fault-hang"))
    fault_hang_seconds: float = field(default=60.0, metadata=_help(
        "simulations only: how long a hung site stays silent (longer than round-timeout)", "fault-hang-seconds"))
    attack: str = field(default="none", metadata=_help(
        "simulations only: what attacking sites send instead of their delta: 'none', 'sign-flip' "
        "(-attack-scale x delta), 'scale' (attack-scale x delta) or 'random' (Gaussian noise of "
        "attack-scale x the delta's norm)", "attack"))
    attack_fraction: float = field(default=0.2, metadata=_help(
        "simulations only: fraction of sites that attack (chosen from the run seed)", "attack-fraction"))
    attack_scale: float = field(default=4.0, metadata=_help("strength of the attack", "attack-scale"))
    max_reply_mib: float = field(default=64.0, metadata=_help("largest train reply accepted (MiB of tensors)",
                                                              "max-reply-mib"))
    max_num_examples: int = field(default=10_000_000, metadata=_help(
        "largest num-examples a reply may claim (a weight an attacker controls)", "max-num-examples"))
    delta_format: str = field(default="float32", metadata=_help(
        "how a site sends its delta: 'float32', 'float16' or 'int8' (one float32 scale per row); quantised "
        "after the DP noise, so epsilon is unchanged (fedpeft.compression)", "delta-format"))
    secure_aggregation: bool = field(default=False, metadata=_help(
        "secure aggregation: sites mask their updates so the coordinator learns only their weighted sum "
        "(fedpeft.secagg; docs/secagg.md)", "secure-aggregation"))
    secagg_threshold: float = field(default=0.6, metadata=_help(
        "secure aggregation: fraction of a round's sites whose shares unmask the sum (at least "
        "min-train-sites and 2); fewer survivors and the round is skipped", "secagg-threshold"))
    error_feedback: bool = field(default=False, metadata=_help(
        "a site keeps what delta-format cut off and adds it to its next delta (saved with its state)",
        "error-feedback"))

    def __post_init__(self) -> None:
        if self.client_cpus <= 0:
            raise bad("client-cpus", self.client_cpus, "must be > 0")
        if self.client_gpus < 0 and self.client_gpus != -1.0:
            raise bad("client-gpus", self.client_gpus, "must be >= 0, or -1 for an equal share of this machine's GPU")
        if not 0.5 <= self.secagg_threshold <= 1.0:
            raise bad("secagg-threshold", self.secagg_threshold,
                      "must be in [0.5, 1]: below half, two disjoint groups of sites could each unmask")
        if self.delta_format not in ("float32", "float16", "int8"):
            raise bad("delta-format", self.delta_format, "must be float32, float16 or int8")
        if self.num_sites < 1:
            raise bad("num-sites", self.num_sites, "must be >= 1")
        if self.num_rounds < 1:
            raise bad("num-server-rounds", self.num_rounds, "must be >= 1")
        if not 0.0 < self.fraction_train <= 1.0:
            raise bad("fraction-train", self.fraction_train, "must be in (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise bad("fraction-evaluate", self.fraction_evaluate, "must be in [0, 1]")
        if self.min_train_sites < 1:
            raise bad("min-train-sites", self.min_train_sites, "must be >= 1")
        if not 0 <= self.sites_per_round <= self.num_sites:
            raise bad("sites-per-round", self.sites_per_round, f"must be in [0, num-sites={self.num_sites}]")
        if 0 < self.sites_per_round < self.min_train_sites:
            raise bad("sites-per-round", self.sites_per_round,
                      f"must be >= min-train-sites={self.min_train_sites} (or 0), else no round can merge")
        if self.strategy not in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"):
            raise bad("strategy", self.strategy, "must be fedavg, fedprox, fedadam, fedyogi or fedadagrad")
        if self.robust not in ("none", "median", "trimmed_mean", "norm_bound"):
            raise bad("robust", self.robust, "must be none, median, trimmed_mean or norm_bound")
        if self.attack not in ("none", "sign-flip", "scale", "random"):
            raise bad("attack", self.attack, "must be none, sign-flip, scale or random")
        if not 0.0 <= self.attack_fraction <= 1.0:
            raise bad("attack-fraction", self.attack_fraction, "must be in [0, 1]")
        if self.round_retries < 0:
            raise bad("round-retries", self.round_retries, "must be >= 0")
        if not 0.0 <= self.fault_late <= 1.0:
            raise bad("fault-late", self.fault_late, "must be in [0, 1]")
        if self.fault_late_seconds < 0:
            raise bad("fault-late-seconds", self.fault_late_seconds, "must be >= 0")
        if not 0.0 <= self.fault_crash <= 1.0:
            raise bad("fault-crash", self.fault_crash, "must be in [0, 1]")
        if self.round_timeout < 0:
            raise bad("round-timeout", self.round_timeout, "must be >= 0 (0 = 24 hours)")
        if not 0.0 <= self.fault_hang <= 1.0:
            raise bad("fault-hang", self.fault_hang, "must be in [0, 1]")
        if self.fault_hang > 0 and not 0 < self.round_timeout < self.fault_hang_seconds:
            raise bad("fault-hang-seconds", self.fault_hang_seconds, f"a hang must outlast round-timeout "
                       f"(round-timeout={self.round_timeout}; 0 would wait 24 hours for the hung site)")
        if not self.max_reply_mib > 0:
            raise bad("max-reply-mib", self.max_reply_mib, "must be > 0")
        if self.max_num_examples < 1:
            raise bad("max-num-examples", self.max_num_examples, "must be >= 1")
        if self.client_cpus <= 0:
            raise bad("client-cpus", self.client_cpus, "must be > 0")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "privacy": PrivacyConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "federation": FederationConfig,
}


RANK_RULES = ("zero_pad", "svd", "stack", "frozen_a")
DELTA_RULES = ("fedavg", "median", "trimmed_mean", "norm_bound")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    preset: str = "hospitals"

    def __post_init__(self) -> None:
        """Checks that span sections: the data fits the task, mixed ranks need a rank rule, rank rules need LoRA."""
        task, source = self.model.task, self.data.source
        if source in SYNTHETIC and SYNTHETIC[source] != task:
            other = next(k for k, v in SYNTHETIC.items() if v == task)
            raise ConfigError(f"data={source!r} is the {SYNTHETIC[source]} generator; task={task!r} needs "
                              f"data={other!r} or a file")
        if task == "classification" and source not in SYNTHETIC and not self.data.label_list:
            raise bad("labels", self.data.labels, "file data needs the shared class list, e.g. labels='a,b,c'")
        if task == "causal-lm" and self.privacy.enabled and self.privacy.grad_sample_mode == "ghost":
            raise ConfigError("grad-sample-mode='ghost' with task='causal-lm': ghost clipping needs one loss per "
                              "logit row, a causal LM has one per response token; use 'hooks'")
        if self.adapter.answer_head and task != "causal-lm":
            raise bad("answer-head", True, f"reads answers out of a causal LM's lm_head; task={task!r} has none")
        merge, ranks = self.federation.merge, self.adapter.rank_list
        if merge not in (*DELTA_RULES, *RANK_RULES):
            raise bad("merge", merge, f"must be one of {', '.join((*DELTA_RULES, *RANK_RULES))}")
        if merge in DELTA_RULES and merge != "fedavg" and len(set(ranks)) > 1:
            raise ConfigError(f"merge={merge!r} needs equal ranks; lora-ranks={self.adapter.ranks!r} mixes them")
        if merge == "fedavg" and len(set(ranks)) > 1:
            raise ConfigError(f"merge='fedavg' averages same-shaped deltas, but lora-ranks={self.adapter.ranks!r} "
                              f"mixes ranks; use merge= one of {', '.join(RANK_RULES)}")
        robust = self.federation.robust
        if robust != "none" and merge not in RANK_RULES:
            raise ConfigError(f"robust={robust!r} composes with a rank rule (merge= one of {', '.join(RANK_RULES)}); "
                              f"with equal ranks use merge={robust!r} (merge={merge!r} now)")
        if robust in ("median", "trimmed_mean") and merge == "stack":
            raise ConfigError(f"robust={robust!r} with merge='stack': stacked components share no coordinates; "
                              "use robust='norm_bound', or merge='zero_pad', 'frozen_a' or 'svd'")
        if merge in RANK_RULES and self.federation.strategy not in ("fedavg", "fedprox"):
            raise ConfigError(f"merge={merge!r} with strategy={self.federation.strategy!r}: a server optimiser's "
                              "moments need a fixed adapter shape; use strategy='fedavg' or 'fedprox'")
        if merge in RANK_RULES and self.adapter.answer_head:
            raise ConfigError(f"merge={merge!r} with answer-head=true: rank rules resize every LoRA, and the "
                              "head's rank is the number of choices; use merge='fedavg' (or a robust rule)")
        if self.adapter.answer_head and self.adapter.answer_head_recentre and \
                self.federation.strategy not in ("fedavg", "fedprox"):
            raise ConfigError(f"answer-head-recentre={self.adapter.answer_head_recentre} with strategy="
                              f"{self.federation.strategy!r}: a server optimiser would take the recentring as a "
                              "step of its own; use strategy='fedavg' or 'fedprox', or answer-head-recentre=0")
        if merge in RANK_RULES and self.adapter.method != "lora":
            raise ConfigError(f"merge={merge!r} merges LoRA factors; adapter={self.adapter.method!r} has none "
                              "(use adapter='lora' or merge='fedavg')")
        if self.adapter.method == "prefix" and task != "causal-lm":
            raise ConfigError(f"adapter='prefix' with task={task!r}: prefix tuning feeds past key/values to every "
                              "attention layer, and transformers' BERT (v5) takes none; use adapter='prompt' or "
                              "'p-tuning'")
        if self.privacy.enabled and self.privacy.grad_sample_mode == "ghost" and self.adapter.method != "lora":
            raise ConfigError(f"grad-sample-mode='ghost' with adapter={self.adapter.method!r}: fedpeft's samplers "
                              "for that method give per-example gradients, not ghost norms; use 'hooks'")
        if self.federation.secure_aggregation:
            self._check_secure_aggregation()

    def _check_secure_aggregation(self) -> None:
        """The coordinator sees one sum: whatever needs the individual updates is refused, saying why.
        ``client-dp=true`` here is distributed DP: the sites add the noise (fedpeft.secagg.ddp)."""
        fed = self.federation
        why = "secure-aggregation=true: the coordinator sees only the sum of the sites' updates, so "
        if fed.merge not in ("fedavg", "frozen_a") or fed.robust != "none":
            raise ConfigError(why + f"merge={fed.merge!r} robust={fed.robust!r} cannot run: robust rules, svd and "
                              "stack need each update; use merge='fedavg' (equal ranks) or 'frozen_a' (mixed ranks: "
                              "an exact weighted sum)")
        if fed.merge == "frozen_a" and self.privacy.client_dp:
            raise ConfigError(why + "client-dp=true with merge='frozen_a' is not built: distributed DP clips each "
                              "site's update, and frozen_a sums local adapters; use merge='fedavg'")
        if fed.delta_format != "float32" or fed.error_feedback:
            raise ConfigError(why + f"delta-format={fed.delta_format!r}/error-feedback: masked vectors are 64-bit "
                              "ring elements, not compressible deltas; use delta-format='float32'")
        if fed.strategy != "fedavg":
            raise ConfigError(why + f"strategy={fed.strategy!r} is not wired yet; use strategy='fedavg'")

    @property
    def rank_rule(self) -> str | None:
        """The heterogeneous-rank rule in use, or None (FedAvg of deltas)."""
        return self.federation.merge if self.federation.merge in RANK_RULES else None

