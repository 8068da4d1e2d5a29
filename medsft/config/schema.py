"""Typed schema of the composed training config (`conf/config.yaml`).

Types only: every value lives in `conf/` (each group's `base.yaml` or `default.yaml` holds its defaults, the
presets say what they change), so a reader finds each default in exactly one place. Every group merges into one
of these dataclasses, so a typo (`optimizer.lrr=1`) or a wrong type (`optimizer.learning_rate=abc`) fails at
composition, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class TinyModelShape:
    """Shape of the randomly initialised Llama used by tests (`model.path=tiny-random:llama`)."""

    vocab_size: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    max_position_embeddings: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING
    revision: Optional[str] = MISSING
    dtype: str = MISSING
    attn_implementation: str = MISSING
    gradient_checkpointing: bool = MISSING
    trust_remote_code: bool = MISSING
    cache_dir: Optional[str] = MISSING
    tiny: TinyModelShape = field(default_factory=TinyModelShape)
    chunked_loss: bool = MISSING
    loss_chunk_tokens: int = MISSING
    use_liger_kernel: bool = MISSING
    compile: bool = MISSING


@dataclass
class FieldMap:
    """Which record keys hold the question, the reasoning, the answer and the (optional) source."""

    question: str = MISSING
    reasoning: str = MISSING
    response: str = MISSING
    source: Optional[str] = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    path: Optional[str] = MISSING
    format: str = MISSING
    file_type: str = MISSING
    split: str = MISSING
    subset: Optional[str] = MISSING
    revision: Optional[str] = MISSING
    fields: FieldMap = field(default_factory=FieldMap)
    response_template: str = MISSING
    system_prompt: Optional[str] = MISSING
    max_samples: int = MISSING
    max_seq_len: int = MISSING
    shuffle: bool = MISSING
    val_ratio: float = MISSING
    val_path: Optional[str] = MISSING
    on_invalid: str = MISSING
    overlong: str = MISSING
    loss_turns: str = MISSING
    headers_in_text: str = MISSING
    mixture: list[Any] = MISSING  # sources: their keys and values are checked by medsft.config.data
    num_proc: int = MISSING
    packing: bool = MISSING
    group_by_length: bool = MISSING
    num_workers: int = MISSING
    cache_dir: Optional[str] = MISSING


@dataclass
class OptimizerConfig:
    name: str = MISSING
    learning_rate: float = MISSING
    weight_decay: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    warmup_rates: float = MISSING
    scheduler: str = MISSING
    min_lr_ratio: float = MISSING
    max_grad_norm: float = MISSING


@dataclass
class TrainConfig:
    train_bsz_per_gpu: int = MISSING
    gradient_accumulation_steps: int = MISSING
    n_epochs: int = MISSING
    max_steps: int = MISSING
    mixed_precision: str = MISSING
    max_consecutive_skips: int = MISSING
    eval_every_n_steps: int = MISSING
    cpu_malloc_mmap_threshold_mb: int = MISSING


@dataclass
class CheckpointConfig:
    every_n_steps: int = MISSING
    save_at_epoch_end: bool = MISSING
    max_ckpts: int = MISSING
    save_final: bool = MISSING
    eval_benchmark: Optional[str] = MISSING
    eval_limit: int = MISSING
    eval_max_new_tokens: int = MISSING
    merge_adapter: bool = MISSING


@dataclass
class ResumeConfig:
    from_checkpoint: str = MISSING
    allow_config_change: bool = MISSING
    overwrite: bool = MISSING


@dataclass
class DeepSpeedConfig:
    name: str = MISSING
    enabled: bool = MISSING
    zero_stage: int = MISSING
    offload_optimizer: bool = MISSING
    offload_params: bool = MISSING
    overlap_comm: bool = MISSING
    contiguous_gradients: bool = MISSING
    reduce_bucket_size: Any = MISSING
    stage3_gather_16bit_weights_on_model_save: bool = MISSING


@dataclass
class FSDPConfig:
    """PyTorch FSDP2 through accelerate (conf/fsdp/, medsft/runtime/fsdp.py); the other sharding engine."""

    name: str = MISSING
    enabled: bool = MISSING
    sharding: str = MISSING
    wrap_layers: Optional[list[str]] = MISSING
    activation_checkpointing: bool = MISSING
    cpu_offload: bool = MISSING
    cpu_ram_efficient_loading: bool = MISSING
    reduce_dtype: str = MISSING


@dataclass
class LauncherConfig:
    name: str = MISSING
    num_processes: int = MISSING
    num_machines: int = MISSING
    machine_rank: int = MISSING
    main_process_ip: Optional[str] = MISSING
    main_process_port: int = MISSING
    rdzv_backend: str = MISSING
    cpu: bool = MISSING


@dataclass
class LoggingConfig:
    name: str = MISSING
    backend: str = MISSING
    wandb_mode: str = MISSING
    wandb_project: str = MISSING
    wandb_entity: Optional[str] = MISSING
    every_n_steps: int = MISSING
    progress_bar: bool = MISSING
    plot: bool = MISSING


@dataclass
class GenerationCheckConfig:
    """Greedy answers to held-out questions before and after training (the demo's proof it learned)."""

    enabled: bool = MISSING
    num_questions: int = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    show_chars: int = MISSING
    repetition_penalty: float = MISSING


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (`peft=none|lora|dora|qlora`, conf/peft/); medsft.models.adapters."""

    name: str = MISSING
    enabled: bool = MISSING
    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: Any = MISSING  # "all-linear" or a list of module names (checked by validation.py)
    modules_to_save: list[str] = MISSING
    use_rslora: bool = MISSING
    use_dora: bool = MISSING
    bias: str = MISSING
    load_in_4bit: bool = MISSING
    bnb_4bit_quant_type: str = MISSING
    bnb_4bit_use_double_quant: bool = MISSING
    bnb_4bit_compute_dtype: str = MISSING


@dataclass
class SweepConfig:
    """Multirun (`--multirun`) behaviour; see medsft/sweep."""

    continue_on_failure: bool = MISSING
    report: bool = MISSING
    checkpoints: str = MISSING


@dataclass
class Config:
    defaults: list[Any] = field(default_factory=list)
    stage: str = MISSING
    experiment_name: str = MISSING
    output_dir: str = MISSING
    log_dir: str = MISSING
    seed: int = MISSING
    push_to_hub: bool = MISSING
    hf_repo_id: Optional[str] = MISSING
    hub_private: bool = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generation_check: GenerationCheckConfig = field(default_factory=GenerationCheckConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    # Stage 2 (stage=rl): typed by medsft.config.rl.RLConfig when an `rl=` preset is selected; null otherwise.
    rl: Any = None
    sweep: SweepConfig = field(default_factory=SweepConfig)


# Field annotations are strings (from __future__ import annotations): the nested schema classes by name.
SCHEMA_TYPES = {cls.__name__: cls for cls in (
    TinyModelShape, ModelConfig, FieldMap, DataConfig, OptimizerConfig, TrainConfig, CheckpointConfig,
    ResumeConfig, DeepSpeedConfig, FSDPConfig, LauncherConfig, LoggingConfig, GenerationCheckConfig, PeftConfig,
    SweepConfig,
)}
