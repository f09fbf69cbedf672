"""TOML sections titan-hybrid adds to TorchTitan's JobConfig.

Selected with ``[job] custom_config_module = "titan_hybrid.config.job_config"``;
TorchTitan merges these dataclasses into its own; ``titan_hybrid.config.check`` checks every
value against these annotations before training (TorchTitan takes TOML values unchecked).
"""

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class HybridModel:
    """Per-run overrides of the flavor named by ``[model] flavor``; unset keys keep the flavor's value."""

    pattern: str | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None
    mlp: Literal["swiglu", "relu2"] | None = None
    """``relu2`` is LeakyReLU(0.5)^2."""
    ffn_dim: int | None = None
    gla_expand_k: float | None = None
    gla_expand_v: float | None = None
    delta_head_dim: int | None = None
    """Key dim per head of the ``d`` / ``2`` / ``k`` mixers; 0 = dim // n_heads."""
    delta_expand_v: float | None = None
    conv_size: int | None = None
    kla_eps: float | None = None
    rope_theta: float | None = None
    rope_dims: int | None = None
    """Partial RoPE: rotate the first N dims of each attention head; 0 = all."""
    attn_sink: bool | None = None
    attn_window: int | None = None
    """Sliding-window attention length in tokens; 0 = full causal."""
    attn_type: Literal["sdpa", "flex"] | None = None
    """``flex``: FlexAttention block masks for documents / windows on CUDA."""
    output_softcap: float | None = None
    """``cap * tanh(logits / cap)`` on the output logits; 0 = off."""
    attn_softcap: float | None = None
    """``cap * tanh(scores / cap)`` on the attention scores; 0 = off (SDPA then runs explicitly: slower)."""
    xsa: bool | list[int] | None = None
    """Exclusive self attention: true = every attention layer, or a list of layer indices."""
    ln_scale: bool | None = None
    """Scale the pre-norm outputs at unrolled depth l by 1 / sqrt(l + 1)."""
    recur_layers: list[int] | None = None
    """Depth recurrence: [first, last] blocks run twice with shared weights once it is on; [] = off."""
    recur_start: float | None = None
    """Recurrence is on after the first floor(recur_start * training.steps) steps."""
    loss_chunk_tokens: int | None = None
    """Fuse the output projection into the loss, this many tokens at a time; 0 = off."""
    document_masking: bool | None = None


@dataclass
class Optimizer:
    """Fields added to TorchTitan's ``[optimizer]``; used when ``name = "GrokAdamW"``."""

    cautious: bool = True
    """Apply only update components whose sign agrees with the gradient, rescaled by the mask mean."""
    grokfast: bool = False
    """Add ``grokfast_lambda`` times an EMA (``grokfast_alpha``) of the gradient to the gradient."""
    grokfast_alpha: float = 0.98
    grokfast_lambda: float = 2.0
    decay_embeddings: bool = True
    """Weight-decay nn.Embedding weights; norms and biases (1-D params) are never decayed."""


@dataclass
class LRScheduler:
    """Fields added to TorchTitan's ``[lr_scheduler]``; each overrides its TorchTitan counterpart."""

    warmup_fraction: float | None = None
    """Warmup as a fraction of the schedule's total steps, instead of ``warmup_steps``."""
    min_lr: float | None = None
    """LR floor as a learning rate, instead of ``min_lr_factor`` (a fraction of ``optimizer.lr``)."""


@dataclass
class DataSource:
    """A corpus of the mix: Parquet shards under ``path`` (hub dataset id or local directory)."""

    path: str = ""
    """Hub dataset id (read by streaming) or a local directory laid out like the hub repo."""
    data_dir: str = ""
    """Folder inside ``path`` whose ``**/*.parquet`` files are the shards (e.g. ``sample/10BT``)."""
    weight: float = 0.0
    """Mixing weight, normalised over the sources; 0 leaves the source out."""
    holdout: list[str] = field(default_factory=list)
    """Shards never trained on (file names or glob patterns relative to ``path/data_dir``);
    ``[hybrid_validation]`` scores them. Held out whether or not this run validates."""


@dataclass
class TextSource(DataSource):
    """Web text or code: every token of ``text_field`` is supervised."""

    text_field: str = "text"


@dataclass
class ReasoningSource(DataSource):
    """Math with reasoning traces: ``prompt <think> reasoning </think> answer``, prompt unsupervised."""

    prompt_field: str = "problem"
    reasoning_field: str = "solution"
    """A list value (e.g. OpenR1's ``generations``) contributes its first element."""
    answer_field: str = "answer"


@dataclass
class HybridData:
    """The ``[hybrid_data]`` pipeline (``data_pipelines.dataloader``); tokenizer: ``[model] hf_assets_path``."""

    web: TextSource = field(
        default_factory=lambda: TextSource(
            path="HuggingFaceFW/fineweb-edu", data_dir="sample/10BT", weight=1.0, text_field="text"
        )
    )
    code: TextSource = field(
        default_factory=lambda: TextSource(path="bigcode/starcoderdata", data_dir="python", text_field="content")
    )
    reasoning: ReasoningSource = field(
        default_factory=lambda: ReasoningSource(path="open-r1/OpenR1-Math-220k", data_dir="data")
    )
    seed: int = 3407
    """Seeds the mixing, the shard order (per epoch) and the shuffle buffers."""
    streams: int = 8
    """Independent data streams, fixed for the whole run; each dp rank reads ``streams / dp_degree``
    of them round-robin, which must divide ``training.local_batch_size``. A checkpoint resumes on
    any dp degree that divides it, with exactly the samples the run would have seen."""
    shuffle_buffer: int = 10000
    """Documents held by each stream's shuffle buffer; 0 or 1 disables sample shuffling."""
    num_workers: int = 0
    """Tokenizer threads per stream; 0 tokenizes in the rank's one loader thread, which keeps up
    with ~350k tokens/s per core. The data does not depend on it."""
    worker_method: Literal["thread", "process"] = "thread"
    """Tokenizer workers as threads or processes."""
    loader: Literal["process", "thread"] = "process"
    """Where each rank's batches are produced ahead of the training loop: ``process`` (a child
    process, so the loader's Python work never takes the training loop's GIL) or ``thread``
    (starts faster; used by the tests). The data does not depend on it."""
    skip_bad_shards: bool = False
    """Skip (and count, in the log) shards that cannot be read or lack a field, instead of failing."""


@dataclass
class ValidationSplit:
    """Where a source's validation data lives when it is not the source's ``holdout`` shards."""

    path: str = ""
    """Hub dataset id or local directory; "" = the ``holdout`` shards of ``[hybrid_data.<source>]``."""
    data_dir: str = ""
    """Folder inside ``path`` (e.g. a ``validation`` split) whose ``**/*.parquet`` files are scored."""


@dataclass
class HybridValidation:
    """Held-out data scored by ``[validation]`` (freq, steps, local_batch_size, seq_len), per source.

    Each listed source is packed and prompt-masked exactly like training (its field names come
    from ``[hybrid_data.<source>]``) and reports loss, perplexity and bits per byte.
    """

    sources: list[str] = field(default_factory=list)
    """Sources to validate, e.g. ``["web", "reasoning"]``; each reads its ``[hybrid_validation.<source>]``
    split or else its ``[hybrid_data.<source>] holdout`` shards."""
    web: ValidationSplit = field(default_factory=ValidationSplit)
    code: ValidationSplit = field(default_factory=ValidationSplit)
    reasoning: ValidationSplit = field(default_factory=ValidationSplit)


@dataclass
class Checkpoint:
    """Fields added to TorchTitan's ``[checkpoint]``; see docs/checkpointing.md."""

    on_fallback: Literal["warn", "stop"] = "warn"
    """When a newer checkpoint is damaged or incomplete: warn and resume from the newest good one,
    or stop the run naming the bad file. Passing over a model-only last save is never a fallback."""
    keep_superseded: int = 3
    """Newest set-aside ``step-N`` folders kept under ``<folder>/superseded/`` (an existing folder is
    moved there when its step is saved again); older ones are deleted. 0 keeps all."""


@dataclass
class Resilience:
    """Non-finite-loss policy and the per-step record (``[resilience]``); see docs/checkpointing.md."""

    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    """On a NaN/Inf loss or gradient norm: stop the run, or skip that step's update (weights and
    optimizer state unchanged)."""
    max_consecutive_skips: int = 10
    """With ``skip``: stop once more than this many steps in a row were non-finite (0 = no cap);
    a run that only skips is not training."""
    step_record: bool = False
    """Append each step's exact loss and batch fingerprints to <dump_folder>/step_record/rank_<r>.jsonl."""
    inject_nonfinite_loss_at: list[int] = field(default_factory=list)
    """Debug: make rank 0's logits NaN at these steps, to exercise the guard."""


@dataclass
class JobConfig:
    hybrid_model: HybridModel = field(default_factory=HybridModel)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    hybrid_data: HybridData = field(default_factory=HybridData)
    hybrid_validation: HybridValidation = field(default_factory=HybridValidation)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    resilience: Resilience = field(default_factory=Resilience)
