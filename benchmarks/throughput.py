"""Throughput benchmark: medsft (padded, grouped by length, packed) against TRL's SFTTrainer (padded,
padding-free), side by side in one process, on the same locally built model, data, batch and token budget.

    python benchmarks/throughput.py                    # CPU: ~30M Llama, seq 2048, ~10-20 min on 2 busy cores
    python benchmarks/throughput.py --examples 12 --rounds 2 --prep-records 2000   # quicker, noisier
    python benchmarks/throughput.py --gpu              # one CUDA GPU (H200): 1B Llama shape, seq 4096, bf16
    python benchmarks/throughput.py --smoke            # seconds: tiny model, plumbing only (tests use it)

What is compared (every mode trains one epoch over the SAME examples, token ids and loss masks, from the same
initial weights, same optimizer settings, same micro-batch budget of `--bsz` rows of `--seq` tokens):

  medsft_padded      data.packing=false: random batches of --bsz examples, right-padded (the default)
  medsft_grouped     data.group_by_length=true: batches of similar length, no padding mask under causal sdpa
  medsft_packed      data.packing=true: best-fit rows of --seq tokens, --bsz rows per micro-batch, one
                     padding-free row with per-example attention (medsft_varlen / flash varlen)
  trl_padded         SFTTrainer, padding_free=False
  trl_padding_free   SFTTrainer, padding_free=True (one flattened row; sdpa then uses a dense block mask)
  extra (--extra):   medsft_packed_cce (chunked cross-entropy, model.use_liger_kernel=true), trl_grouped
                     (train_sampling_strategy=group_by_length)

The modes run interleaved in --rounds rounds (after one warm-up step of each framework; the order alternates
between rounds), so load from other processes hits all of them alike. Each mode's headline figure is its best
round (load only ever slows a run down), with the median and every round's figure beside it; ratios are of
best rounds, with the per-round ratios shown too. tokens/s counts real tokens only (the examples' tokens, never padding). Peak memory: on CUDA
torch.cuda.max_memory_allocated; on CPU the peak RSS above the RSS before the model was loaded, sampled every
5 ms (malloc_trim between runs). MFU on CUDA only (medsft.compute.flops).

Data preparation: validate + tokenize --prep-records records (the mixed records repeated with a distinct case
number): medsft's build_sft_data without cache against TRL's dataset preparation (SFTTrainer construction on
a prompt-completion dataset, minus the construction on a one-record dataset).

Data: HuatuoGPT-o1's English demo records (MEDSFT_HUATUO_DEMO or /work/shared/data/huatuo_o1/demo_data.json;
skipped with a message when absent) plus the bundled Spanish data/demo_data.json. Output: a table and one
JSON line per configuration on stdout (`--json-out FILE` also writes the JSON lines to a file).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

EN_DEMO = Path(os.environ.get("MEDSFT_HUATUO_DEMO", "/work/shared/data/huatuo_o1/demo_data.json"))
ES_DEMO = ROOT / "data" / "demo_data.json"
BASE_MODES = ("medsft_padded", "medsft_grouped", "medsft_packed", "trl_padded", "trl_padding_free")
EXTRA_MODES = ("medsft_packed_cce", "trl_grouped")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def data_node(path: Path, max_seq_len: int):
    """The `data` config node of conf/ (its defaults) for `path`, cut at max_seq_len."""
    from medsft.config import compose

    node = compose(["~experiment"]).data
    node.path, node.max_seq_len = str(path), int(max_seq_len)
    return node


# (hidden, intermediate, layers, heads, kv heads, model vocab, tokenizer vocab)
SHAPES = {
    "cpu30m": (512, 1376, 8, 8, 8, 8192, 8192),  # 29.5M parameters
    "cpu29m_v2k": (512, 1184, 10, 8, 8, 2000, 2000),  # 29.2M: the shape of issue 20's independent measurement
    "gpu1b": (2048, 8192, 16, 32, 8, 128256, 8192),  # Llama-3.2-1B shape, 1.24B parameters
    "tiny": (64, 128, 2, 4, 2, 512, 512),
}

log = logging.getLogger("bench")


# --------------------------------------------------------------------------------------------------- data


def english_first_records(n: int) -> tuple[list[dict], str]:
    """The first n HuatuoGPT-o1 English demo records in file order (mapped to the Spanish schema)."""
    if not EN_DEMO.is_file():
        raise SystemExit(f"--data en_first needs the English HuatuoGPT-o1 demo records: {EN_DEMO} is absent "
                         "(set MEDSFT_HUATUO_DEMO)")
    rows = json.loads(EN_DEMO.read_text(encoding="utf-8"))[:n]
    records = [{"Pregunta": r["Question"], "Razonamiento_Complejo": r["Complex_CoT"], "Respuesta": r["Response"]}
               for r in rows]
    return records, f"the first {len(records)} English records of {EN_DEMO}, in file order"


def mixed_records() -> tuple[list[dict], str]:
    """English HuatuoGPT-o1 demo records (mapped to the Spanish schema) + the bundled Spanish ones."""
    records, notes = [], []
    if EN_DEMO.is_file():
        for r in json.loads(EN_DEMO.read_text(encoding="utf-8")):
            records.append({"Pregunta": r["Question"], "Razonamiento_Complejo": r["Complex_CoT"],
                            "Respuesta": r["Response"]})
        notes.append(f"{len(records)} English records from {EN_DEMO}")
    else:
        notes.append(f"SKIPPED the English HuatuoGPT-o1 demo records: {EN_DEMO} is absent "
                     "(set MEDSFT_HUATUO_DEMO); Spanish records only")
    spanish = json.loads(ES_DEMO.read_text(encoding="utf-8"))
    records += [{k: r[k] for k in ("Pregunta", "Razonamiento_Complejo", "Respuesta")} for r in spanish]
    notes.append(f"{len(spanish)} Spanish records from {ES_DEMO.relative_to(ROOT)}")
    return records, "; ".join(notes)


def build_model(out_dir: Path, shape_name: str, records: list[dict]) -> str:
    """A random Llama of the shape and a byte-level BPE tokenizer trained on the records (Llama-3 splitting)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from medsft.data.templates import FINAL_RESPONSE_HEADER, LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS, THINKING_HEADER
    from medsft.models.tiny import tiny_special_tokens

    hidden, inter, layers, heads, kv, vocab, tok_vocab = SHAPES[shape_name]
    marker = out_dir / "bench-model.json"
    key = {"shape": SHAPES[shape_name], "records": len(records), "v": 1}
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = [t for r in records for t in r.values()] + [THINKING_HEADER, FINAL_RESPONSE_HEADER]
    specials = tiny_special_tokens()
    bos = LLAMA3_SPECIAL_TOKENS["bos_token"]
    tok = Tokenizer(models.BPE())
    # Llama-3's split (newline runs are one piece) keeps the chat prompt a token prefix of the conversation.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=tok_vocab, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=LLAMA3_SPECIAL_TOKENS["eos_token"],
        pad_token=LLAMA3_SPECIAL_TOKENS["pad_token"], extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS["additional"]),
        chat_template=LLAMA3_CHAT_TEMPLATE, model_max_length=8192, clean_up_tokenization_spaces=False,
    )
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=8192, tie_word_embeddings=True, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(key))
    return str(out_dir)


# ------------------------------------------------------------------------------------------------ memory


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS above the starting RSS on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak_mb = 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = self.rss_mb()
            self._top = self.base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._top = max(self._top, self.rss_mb())

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._top, self.rss_mb()) - self.base
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Result:
    mode: str
    round: int
    tokens: int  # real tokens trained on
    seconds: float
    steps: int
    peak_mem_mb: float
    padding_efficiency: float
    final_loss: Optional[float] = None
    mfu: Optional[float] = None
    flops: Optional[float] = None  # useful training FLOPs of the timed steps (medsft.compute.flops)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# --------------------------------------------------------------------------------------------- medsft runs


class Bench:
    def __init__(self, args, work: Path, model_dir: str, data_path: Path):
        import torch

        self.args, self.work, self.model_dir, self.data_path = args, work, model_dir, data_path
        self.cuda = args.gpu and torch.cuda.is_available()
        self.torch = torch
        self.examples = None  # the N examples every mode trains on (token ids + labels)
        self.model_flops = None

    def bf16(self, mode: str) -> bool:
        return self.cuda or mode.endswith("_bf16")

    def overrides(self, mode: str, run: str) -> list[str]:
        a = self.args
        base_mode = mode.removesuffix("_bf16")
        out = [
            "model=tiny_random", f"model.path={self.model_dir}", "model.dtype=float32",
            f"model.attn_implementation={'flash_attention_2' if self.cuda and a.flash else 'sdpa'}",
            f"data.path={self.data_path}", f"data.max_seq_len={a.seq}", f"data.max_samples={a.examples}",
            "data.val_ratio=0", f"data.cache_dir={self.work / 'data-cache'}",
            f"train.train_bsz_per_gpu={a.bsz}", "train.gradient_accumulation_steps=1", f"train.n_epochs={a.epochs}",
            f"train.mixed_precision={'bf16' if self.bf16(mode) else 'no'}",
            f"launcher.cpu={'false' if self.cuda else 'true'}",
            f"optimizer.learning_rate={a.lr}", "optimizer.warmup_rates=0", "optimizer.scheduler=constant",
            "logging=none", "logging.progress_bar=false", "generation_check.enabled=false",
            f"output_dir={self.work / 'ckpts'}", f"log_dir={self.work / 'logs'}", f"experiment_name=bench-{run}",
            f"seed={a.seed}",
        ]
        if base_mode in ("medsft_packed", "medsft_packed_cce"):
            out.append("data.packing=true")
        if base_mode in ("medsft_grouped", "medsft_grouped_cce"):
            out.append("data.group_by_length=true")
        if base_mode.endswith("_cce") or (mode.startswith("medsft") and a.liger):
            out.append("model.use_liger_kernel=true")
        if base_mode.endswith("_compile") or (a.compile and mode.startswith("medsft")):
            out.append("model.compile=true")
        if base_mode.startswith("medsft_padded_cce"):
            out.append("model.chunked_loss=true")
        return out

    def medsft(self, mode: str, rnd: int, warmup_only: bool = False) -> Optional[Result]:
        from train_utils import compose_cfg, reset_accelerate

        from medsft.train.loop import _cleanup, optimizer_step, setup
        from medsft.train.metrics import MetricWindow

        reset_accelerate()
        cfg = compose_cfg(self.overrides(mode, f"{mode}-{rnd}"))
        with PeakMemory(self.cuda) as mem:
            ctx = setup(cfg, self.work / "runs" / f"{mode}-{rnd}")
            try:
                if self.examples is None:
                    self.examples = list(ctx.data.train)
                ctx.model.train()
                groups = ctx.order.step_groups(ctx.plan, 0, 0)
                if warmup_only:
                    optimizer_step(ctx, groups[0], MetricWindow())
                    return None
                window = MetricWindow()
                seconds, tokens, padded, steps = 0.0, 0, 0, 0
                for epoch in range(ctx.plan.epochs):
                    if epoch:
                        groups = ctx.order.step_groups(ctx.plan, epoch, 0)
                    for group in groups:
                        self._sync()
                        t0 = time.perf_counter()
                        optimizer_step(ctx, group, window)
                        self._sync()
                        seconds += time.perf_counter() - t0
                        steps += 1
                tokens = int(window.sums["tokens"])
                padded = int(window.sums["padded_tokens"])
                loss = window.sums["loss_sum"] / max(window.sums["loss_tokens"], 1)
                mfu = None
                if ctx.peak_flops:
                    mfu = window.sums["flops"] / seconds / ctx.peak_flops
                flops = window.sums["flops"]
            finally:
                _cleanup(ctx)
                del ctx
                reset_accelerate()
        return Result(mode, rnd, tokens, seconds, steps, mem.peak_mb, tokens / padded, loss, mfu, flops)

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    # ------------------------------------------------------------------------------------------ TRL runs

    def trl(self, mode: str, rnd: int, warmup_only: bool = False) -> Optional[Result]:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
        from trl import SFTConfig, SFTTrainer

        a = self.args
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        rows = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in self.examples]
        if warmup_only:
            rows = rows[: a.bsz]
        dataset = Dataset.from_list(rows)
        stats = {"real": 0, "computed": 0}
        times: dict = {}

        class Timer(TrainerCallback):
            def on_epoch_begin(self, args, state, control, **kw):
                if "start" not in times:
                    _sync()
                    times["start"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                times["end"] = time.perf_counter()
                times["steps"] = times.get("steps", 0) + 1

        def _sync():
            if self.cuda:
                torch.cuda.synchronize()

        extra = {}
        base_mode = mode.removesuffix("_bf16")
        if base_mode == "trl_grouped":
            extra["train_sampling_strategy"] = "group_by_length"
        if base_mode.endswith("_compile"):
            extra["torch_compile"] = True
        attn = "flash_attention_2" if (self.cuda and a.flash) else "sdpa"
        config = SFTConfig(
            output_dir=str(self.work / "trl" / f"{mode}-{rnd}"), per_device_train_batch_size=a.bsz,
            gradient_accumulation_steps=1, num_train_epochs=a.epochs if not warmup_only else 1,
            learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9,
            adam_beta2=0.95, max_grad_norm=1.0, padding_free=base_mode.startswith("trl_padding_free"),
            # padding-free refuses max_length (it cannot enforce it); the examples already fit --seq
            max_length=None if base_mode.startswith("trl_padding_free") else a.seq,
            logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=not self.cuda, bf16=self.bf16(mode),
            seed=a.seed, dataloader_num_workers=0, disable_tqdm=True, **extra,
        )
        with PeakMemory(self.cuda) as mem:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32, attn_implementation=attn)
            if self.cuda:
                model.to("cuda")
            trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 callbacks=[Timer()])
            trainer.remove_callback(PrinterCallback)
            collate = trainer.data_collator

            def counting_collator(examples):
                batch = collate(examples)
                stats["real"] += sum(len(e["input_ids"]) for e in examples)
                stats["computed"] += batch["input_ids"].numel()
                return batch

            trainer.data_collator = counting_collator
            output = trainer.train()
            del trainer, model
        if warmup_only:
            return None
        tokens = sum(len(ex["input_ids"]) for ex in self.examples) * a.epochs
        seconds = times["end"] - times["start"]
        from medsft.compute.flops import ModelFlops, peak_flops

        if self.model_flops is None:
            from transformers import AutoConfig

            with torch.device("meta"):
                self.model_flops = ModelFlops.of(AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(self.model_dir)))
        flops = self.model_flops.training_flops(tokens, [len(ex["input_ids"]) for ex in self.examples] * a.epochs)
        mfu = None
        if self.cuda:
            peak = peak_flops(torch.cuda.get_device_name(), "bf16")
            mfu = flops / seconds / peak if peak else None
        return Result(mode, rnd, tokens, seconds, times.get("steps", 0), mem.peak_mb,
                      stats["real"] / max(stats["computed"], 1), float(output.training_loss), mfu, flops)

    def run(self, mode: str, rnd: int, warmup_only: bool = False) -> Optional[Result]:
        return (self.medsft if mode.startswith("medsft") else self.trl)(mode, rnd, warmup_only)


# ------------------------------------------------------------------------------------------- GEMM peak


def gemm_peak(dtype_name: str, size: int = 2048, seconds: float = 2.0) -> float:
    """This machine's measured matmul peak (FLOP/s) in fp32 or bf16: the best of timed [size, size] x
    [size, size] products with torch's current thread count. The ceiling each configuration's achieved FLOP/s
    is compared with (on CPU there is no spec sheet to read it from)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(3):
        a @ b
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


# ------------------------------------------------------------------------------------- GPU equivalence


def packed_equivalence(model_dir: str, examples: list[dict], device: str, n: int = 4) -> dict:
    """Logits of n examples packed into one row (medsft_varlen: torch varlen / per-example sdpa) against each
    example alone, bf16 autocast on `device`: the boundary handling of the kernel actually used there."""
    import torch
    from transformers import AutoModelForCausalLM

    from medsft.data.packing import PackedCollator
    from medsft.compute import attention

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    model.set_attn_implementation(attention.VARLEN)
    chosen = examples[:n]
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in PackedCollator(0)(chosen).items()}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    worst = 0.0
    with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
        packed = model(**attention.model_inputs(batch, attention.VARLEN)).logits.float()
        cu = batch["cu_seq_lens"].tolist()
        for k, ex in enumerate(chosen):
            alone = model(input_ids=torch.tensor([ex["input_ids"]], device=device), use_cache=False).logits.float()
            worst = max(worst, float((packed[:, cu[k]:cu[k + 1]] - alone).abs().max() / alone.abs().max()))
    used = "torch varlen" if (device == "cuda" and not attention._TORCH_VARLEN_FAILED) else "per-example sdpa"
    del model
    return {"bench": "packed_equivalence", "device": device, "kernel": used, "examples": len(chosen),
            "max_rel_diff": worst, "ok": worst < (2e-2 if device == "cuda" else 1e-5)}


# ----------------------------------------------------------------------------------------------- data prep


def prep_records(records: list[dict], n: int) -> list[dict]:
    out = []
    for i in range(n):
        r = records[i % len(records)]
        out.append({"Pregunta": f"{r['Pregunta']} (caso {i})", "Razonamiento_Complejo": r["Razonamiento_Complejo"],
                    "Respuesta": r["Respuesta"]})
    return out


def bench_data_prep(args, work: Path, model_dir: str, records: list[dict]) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from medsft.data.dataset import build_sft_data
    from medsft.data.render import format_response
    from medsft.data.templates import DEFAULT_RESPONSE_TEMPLATE

    path = work / f"prep-{args.prep_records}.json"
    path.write_text(json.dumps(prep_records(records, args.prep_records), ensure_ascii=False), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")

    def medsft_prep():
        t0 = time.perf_counter()
        data = build_sft_data(data_node(path, args.seq), tokenizer, seed=0, use_cache=False, progress=False)
        return time.perf_counter() - t0, len(data.train)

    def trl_dataset(rows):
        return Dataset.from_list([
            {"prompt": [{"role": "user", "content": r["Pregunta"]}],
             "completion": [{"role": "assistant", "content": format_response(
                 DEFAULT_RESPONSE_TEMPLATE, r["Razonamiento_Complejo"], r["Respuesta"])}]}
            for r in rows])

    def trl_prep(num_proc: Optional[int]):
        def construct(rows):
            config = SFTConfig(output_dir=str(work / "trl-prep"), max_length=args.seq, report_to=[], use_cpu=True,
                               dataset_num_proc=num_proc, disable_tqdm=True)
            t0 = time.perf_counter()
            trainer = SFTTrainer(model=model, args=config, train_dataset=trl_dataset(rows), processing_class=tokenizer)
            n = len(trainer.train_dataset)
            return time.perf_counter() - t0, n

        t0 = time.perf_counter()
        rows = json.loads(path.read_text(encoding="utf-8"))  # read like medsft does, inside the timing
        load = time.perf_counter() - t0
        full, n = construct(rows)
        empty, _ = construct(rows[:1])
        return load + full - empty, n

    results = []
    runs = {"medsft_build_sft_data": medsft_prep, "trl_prepare_dataset": lambda: trl_prep(None)}
    if args.trl_prep_num_proc > 1:
        runs[f"trl_prepare_dataset_num_proc{args.trl_prep_num_proc}"] = lambda: trl_prep(args.trl_prep_num_proc)
    timings: dict = {k: [] for k in runs}
    for _ in range(args.prep_rounds):
        for name, fn in runs.items():
            seconds, n = fn()
            timings[name].append((seconds, n))
    for name, values in timings.items():
        secs = [s for s, _ in values]
        results.append({"bench": "data_prep", "config": name, "records": args.prep_records, "examples": values[0][1],
                        "seconds_median": round(statistics.median(secs), 3), "seconds": [round(s, 3) for s in secs],
                        "records_per_s": round(args.prep_records / statistics.median(secs), 1)})
    m = next(r for r in results if r["config"] == "medsft_build_sft_data")
    for r in results:
        r["speedup_of_medsft"] = round(r["seconds_median"] / m["seconds_median"], 2)
    return results


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA run: 1B Llama shape, seq 4096, bf16, flash/varlen")
    p.add_argument("--smoke", action="store_true", help="tiny model, few examples: plumbing check in seconds")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--seq", type=int, default=None, help="max_seq_len (default 2048 CPU, 4096 GPU)")
    p.add_argument("--bsz", type=int, default=None, help="rows per micro-batch (default 2 CPU, 4 GPU)")
    p.add_argument("--examples", type=int, default=None, help="examples every mode trains on (default 16 CPU, all GPU)")
    p.add_argument("--epochs", type=int, default=None, help="epochs over them (default 1 CPU, 2 GPU)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--modes", default=",".join(BASE_MODES))
    p.add_argument("--extra", action="store_true", help=f"also {', '.join(EXTRA_MODES)}")
    p.add_argument("--liger", action="store_true", help="model.use_liger_kernel=true for every medsft mode")
    p.add_argument("--compile", action="store_true", help="model.compile=true for medsft modes")
    p.add_argument("--no-flash", dest="flash", action="store_false", help="GPU: sdpa even if flash-attn exists")
    p.add_argument("--prep-records", type=int, default=None, help="data-prep records (default 10000; 0 = skip)")
    p.add_argument("--prep-rounds", type=int, default=2)
    p.add_argument("--trl-prep-num-proc", type=int, default=1, help="also TRL prep with dataset_num_proc=N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--work-dir", default=None, help="models/caches (default: a temp dir; models are reused there)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default=None,
                   help="CPU: fp32 modes, bf16 modes (medsft train.mixed_precision=bf16, TRL bf16=True; suffix _bf16) "
                        "or both (default: both where the CPU has native bf16 units, else fp32)")
    p.add_argument("--workload", choices=("synthetic", "smollm2"), default="synthetic",
                   help="synthetic: a random Llama of --shape; smollm2: the embedded SmolLM2-135M (vocab 49k)")
    p.add_argument("--data", choices=("mixed", "en_first"), default="mixed",
                   help="mixed: English + Spanish demo records; en_first: the first --examples English records")
    p.add_argument("--no-gemm", dest="gemm", action="store_false", help="skip measuring the GEMM peaks")
    a = p.parse_args(argv)
    if a.smoke:
        d = dict(shape="tiny", seq=4096, bsz=2, examples=6, epochs=1, rounds=1, prep=60)
    elif a.gpu:
        d = dict(shape="gpu1b", seq=4096, bsz=4, examples=0, epochs=2, rounds=3, prep=10000)
    else:
        d = dict(shape="cpu30m", seq=2048, bsz=2, examples=16, epochs=1, rounds=3, prep=10000)
    a.shape = a.shape or d["shape"]
    a.seq = a.seq or d["seq"]
    a.bsz = a.bsz or d["bsz"]
    a.examples = d["examples"] if a.examples is None else a.examples
    a.epochs = a.epochs or d["epochs"]
    a.rounds = a.rounds or d["rounds"]
    a.prep_records = d["prep"] if a.prep_records is None else a.prep_records
    a.modes = [m for m in a.modes.split(",") if m] + (list(EXTRA_MODES) if a.extra else [])
    if a.precision is None:
        from medsft.hardware import cpu_bf16_flags

        a.precision = "both" if (not a.gpu and cpu_bf16_flags() and not a.smoke) else "fp32"
    if not a.gpu and a.precision != "fp32":
        plain = [m for m in a.modes if not m.endswith("_bf16")]
        bf16 = [f"{m}_bf16" for m in plain]
        a.modes = bf16 if a.precision == "bf16" else plain + [m for m in bf16 if m not in a.modes]
    if a.gpu and a.liger is False and "medsft_packed_cce" not in a.modes:
        a.modes.append("medsft_packed_cce")  # the memory goal compares it with medsft_packed
    return a


def summarize(results: list[Result], modes: list[str], peaks: Optional[dict] = None) -> list[dict]:
    by_mode = {m: [r for r in results if r.mode == m] for m in modes}
    rounds = sorted({r.round for r in results})
    rows = []
    trl_modes = [m for m in modes if m.startswith("trl") and by_mode[m]]
    med_modes = [m for m in modes if m.startswith("medsft") and by_mode[m]]
    for m in modes:
        rs = by_mode[m]
        if not rs:
            continue
        tps = [r.tokens_per_s for r in rs]
        base = by_mode.get("trl_padded") or []
        ratio = [r.tokens_per_s / b.tokens_per_s for r in rs for b in base if b.round == r.round]
        rows.append({
            "bench": "throughput", "config": m, "tokens_per_s": round(statistics.median(tps), 1),
            "tokens_per_s_best": round(max(tps), 1),
            "tokens_per_s_rounds": [round(x, 1) for x in tps], "real_tokens": rs[0].tokens,
            "steps": rs[0].steps, "padding_efficiency": round(statistics.median(r.padding_efficiency for r in rs), 4),
            "peak_mem_mb": round(statistics.median(r.peak_mem_mb for r in rs), 1),
            "final_loss": round(statistics.median(r.final_loss for r in rs), 4) if rs[0].final_loss is not None else None,
            "mfu": round(statistics.median(r.mfu for r in rs), 4) if rs[0].mfu is not None else None,
            "gflops_best": round(max(r.flops / r.seconds for r in rs) / 1e9, 2) if rs[0].flops else None,
            "of_gemm_peak": (round(max(r.flops / r.seconds for r in rs) / peaks["bf16" if m.endswith("_bf16") else "fp32"],
                                   3) if (rs[0].flops and peaks) else None),
            "vs_trl_padded": round(max(tps) / max(b.tokens_per_s for b in base), 3) if base else None,
            "vs_trl_padded_per_round_median": round(statistics.median(ratio), 3) if ratio else None,
        })
    def best_vs_best(name: str, med: list[str], trl: list[str]) -> None:
        if not (med and trl):
            return
        per_round = []
        for rnd in rounds:
            best_m = max((r.tokens_per_s for r in results if r.round == rnd and r.mode in med), default=None)
            best_t = max((r.tokens_per_s for r in results if r.round == rnd and r.mode in trl), default=None)
            if best_m and best_t:
                per_round.append(best_m / best_t)
        # Best of rounds: load from other processes only ever slows a run down, so each mode's fastest round is
        # the least disturbed estimate (timeit's rule); the per-round ratios are shown too.
        med_best = max(med, key=lambda m: max(r.tokens_per_s for r in by_mode[m]))
        trl_best = max(trl, key=lambda m: max(r.tokens_per_s for r in by_mode[m]))
        best_ratio = max(r.tokens_per_s for r in by_mode[med_best]) / max(r.tokens_per_s for r in by_mode[trl_best])
        rows.append({"bench": "throughput", "config": name, "medsft_best": med_best, "trl_best": trl_best,
                     "ratio_best_of_rounds": round(best_ratio, 3),
                     "ratio_median_of_rounds": round(statistics.median(per_round), 3) if per_round else None,
                     "ratio_rounds": [round(x, 3) for x in per_round]})

    best_vs_best("best_vs_best", med_modes, trl_modes)
    if any(m.endswith("_bf16") for m in med_modes + trl_modes):  # the same without bf16 on either side
        best_vs_best("best_vs_best_fp32", [m for m in med_modes if not m.endswith("_bf16")],
                     [m for m in trl_modes if not m.endswith("_bf16")])
    goals = {}
    if by_mode.get("medsft_packed") and by_mode.get("medsft_padded"):
        goals["packed_over_padded"] = round(statistics.median(_paired(by_mode["medsft_packed"], by_mode["medsft_padded"],
                                                                      lambda r: r.tokens_per_s)), 3)
    if by_mode.get("medsft_packed_cce") and by_mode.get("medsft_packed"):
        goals["cce_peak_mem_over_dense"] = round(statistics.median(_paired(
            by_mode["medsft_packed_cce"], by_mode["medsft_packed"], lambda r: r.peak_mem_mb)), 3)
    if by_mode.get("medsft_packed") and by_mode["medsft_packed"][0].mfu is not None:
        goals["packed_mfu"] = round(statistics.median(r.mfu for r in by_mode["medsft_packed"]), 4)
    if goals:
        rows.append({"bench": "throughput", "config": "goals", **goals})
    return rows


def _paired(a: list[Result], b: list[Result], value) -> list[float]:
    """Per-round ratios value(a) / value(b)."""
    out = [value(x) / value(y) for x in a for y in b if x.round == y.round and value(y)]
    return out or [float("nan")]


def print_table(rows: list[dict], prep: list[dict], header: str) -> None:
    print("\n" + header)
    print(f"{'config':<26} {'tok/s best':>10} {'tok/s median':>12} {'vs trl_padded':>14} {'pad eff':>8} "
          f"{'peak MB':>9} {'steps':>6} {'loss':>8} {'MFU':>7} {'GFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        if r["config"] in ("best_vs_best", "best_vs_best_fp32", "goals"):
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        ratio = f"{r['vs_trl_padded']:.2f}x" if r["vs_trl_padded"] is not None else "-"
        loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "-"
        gflops = f"{r['gflops_best']:.1f}" if r.get("gflops_best") is not None else "-"
        peak = f"{r['of_gemm_peak']:.1%}" if r.get("of_gemm_peak") is not None else "-"
        print(f"{r['config']:<26} {r['tokens_per_s_best']:>10.1f} {r['tokens_per_s']:>12.1f} {ratio:>14} "
              f"{r['padding_efficiency']:>8.3f} {r['peak_mem_mb']:>9.0f} {r['steps']:>6} {loss:>8} {mfu:>7} "
              f"{gflops:>8} {peak:>8}")
    for r in rows:
        if r["config"] in ("best_vs_best", "best_vs_best_fp32"):
            print(("fp32 only: " if r["config"].endswith("fp32") else "") + f"best medsft ({r['medsft_best']}) / best TRL ({r['trl_best']}): {r['ratio_best_of_rounds']:.2f}x "
                  f"best of rounds; per-round ratios of the best modes {r['ratio_rounds']} "
                  f"(median {r['ratio_median_of_rounds']:.2f}x)")
        if r["config"] == "goals":
            print("medsft: " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("bench", "config")))
    for r in prep:
        print(f"data prep {r['config']:<40} {r['seconds_median']:>8.2f} s  ({r['records_per_s']:.0f} records/s; "
              f"medsft is {r['speedup_of_medsft']:.2f}x faster)" if r["config"] != "medsft_build_sft_data" else
              f"data prep {r['config']:<40} {r['seconds_median']:>8.2f} s  ({r['records_per_s']:.0f} records/s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("medsft.compute.attention", "medsft.compute.kernels"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device here; running the GPU configuration on CPU (expect it to be very slow)",
              file=sys.stderr)
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed (pip install -e '.[bench]'); TRL modes skipped", file=sys.stderr)
        args.modes = [m for m in args.modes if not m.startswith("trl")]
    if args.gpu and args.flash:
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            print("flash-attn is not installed: medsft packs with medsft_varlen (sdpa flash kernel per example), TRL "
                  "runs sdpa", file=sys.stderr)
            args.flash = False

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="medsft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.data == "en_first":
        records, data_note = english_first_records(args.examples or 16)
    else:
        records, data_note = mixed_records()
    data_path = work / f"{args.data}.json"
    data_path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    if args.workload == "smollm2":
        from medsft.models import prepare_embedded_smollm2

        model_dir = prepare_embedded_smollm2()
        args.shape = "smollm2-135m"
    else:
        model_dir = build_model(work / f"model-{args.shape}", args.shape, records)
    if args.examples == 0:
        args.examples = len(records)
    env = {"bench": "env", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": torch.cuda.get_device_name() if (args.gpu and torch.cuda.is_available()) else "cpu",
           "data": data_note, "shape": args.shape, "seq": args.seq, "bsz": args.bsz, "examples": args.examples,
           "epochs": args.epochs, "rounds": args.rounds, "modes": args.modes,
           "load_avg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        import transformers
        import trl

        env.update(transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    print(json.dumps(env), flush=True)
    peaks = {}
    if args.gemm and not (args.gpu and torch.cuda.is_available()):
        peaks = {name: gemm_peak(name) for name in ("fp32", "bf16")}
        print(json.dumps({"bench": "gemm_peak", "threads": torch.get_num_threads(),
                          **{f"{k}_gflops": round(v / 1e9, 1) for k, v in peaks.items()}}), flush=True)
    args.peaks = peaks

    bench = Bench(args, work, model_dir, data_path)
    if bench.cuda:
        from medsft.data.dataset import build_sft_data
        from transformers import AutoTokenizer

        check_examples = build_sft_data(data_node(data_path, args.seq), AutoTokenizer.from_pretrained(model_dir),
                                        seed=0, use_cache=False).train
        print(json.dumps(packed_equivalence(model_dir, check_examples, "cuda")), flush=True)
    lines: list[dict] = []
    # One warm-up step of each framework (first kernels, allocator growth), not timed.
    if not args.smoke:
        bench.run("medsft_padded", -1, warmup_only=True)
        if any(m.startswith("trl") for m in args.modes):
            bench.run("trl_padded", -1, warmup_only=True)
    results: list[Result] = []
    for rnd in range(args.rounds):
        order = args.modes if rnd % 2 == 0 else list(reversed(args.modes))  # alternate who goes first
        for mode in order:
            result = bench.run(mode, rnd)
            results.append(result)
            line = {"bench": "throughput_round", **asdict(result), "tokens_per_s": round(result.tokens_per_s, 1)}
            print(json.dumps(line), flush=True)
    rows = summarize(results, args.modes, args.peaks)
    prep = bench_data_prep(args, work, model_dir, records) if args.prep_records else []
    if prep:
        m = next(r for r in prep if r["config"] == "medsft_build_sft_data")
        t = next(r for r in prep if r["config"] == "trl_prepare_dataset")
        prep.append({"bench": "data_prep", "config": "ratio", "trl_over_medsft": round(t["seconds_median"] /
                                                                                      m["seconds_median"], 2)})
    lines = rows + prep
    header = (f"== medsft vs TRL: {args.shape} model, seq {args.seq}, {args.bsz} rows/micro-batch, {args.examples} "
              f"examples x {args.epochs} epoch(s), {args.rounds} rounds, {env['device']} ==")
    if args.peaks:
        header += ("\nmeasured GEMM peak of this machine: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s"
                                                                    for k, v in args.peaks.items()))
    print_table(rows, [r for r in prep if r["config"] != "ratio"], header)
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.json_out:
        Path(args.json_out).write_text("".join(json.dumps(x) + "\n" for x in [env, *lines]), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
