"""Model FLOPs utilisation (MFU): useful training FLOPs per second over the device's peak.

Training FLOPs of a micro-batch (PaLM appendix B convention, the one nanoGPT and most MFU reports use):

    6 * N * tokens  +  12 * n_layers * d_attn * sum_i(L_i^2)

N counts the parameters that take part in matrix multiplies per token: every parameter except the input
embedding table, plus the LM head (counted once even when tied to the embeddings). The attention term counts
QK^T and AV, forward and backward, over each real example of length L_i (padding and cross-example pairs are
not useful work, so a packed row counts its examples, not its full width; causal halving is not applied, as
in PaLM). Only real tokens count, so padding lowers MFU as it should.

MFU is reported on CUDA devices whose peak is known (dense, no sparsity, from the vendors' data sheets);
elsewhere it is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

# Dense peak FLOP/s per GPU by precision (vendor data sheets, without 2:4 sparsity).
PEAK_FLOPS = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},  # SXM
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
}


def peak_flops(device_name: str, precision: str = "bf16") -> Optional[float]:
    """Peak FLOP/s for a CUDA device name (as torch.cuda.get_device_name prints it), or None if unknown."""
    name = device_name.upper()
    if "H200" in name:
        key = "H200"
    elif "H100" in name:
        key = "H100 PCIe" if "PCIE" in name else "H100"
    elif "A100" in name:
        key = "A100"
    else:
        return None
    return PEAK_FLOPS[key].get(precision)


def device_peak_flops(device: torch.device, mixed_precision: str = "bf16", model_dtype=None) -> Optional[float]:
    """Peak of `device` for the precision training runs in; None on CPU or an unknown GPU."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if mixed_precision in ("bf16", "fp16"):
        precision = mixed_precision
    elif model_dtype in (torch.bfloat16, torch.float16):
        precision = "bf16" if model_dtype == torch.bfloat16 else "fp16"
    else:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return peak_flops(torch.cuda.get_device_name(device), precision)


@dataclass(frozen=True)
class ModelFlops:
    """Per-model constants of the FLOP count."""

    matmul_params: int  # N above
    n_layers: int
    d_attn: int  # num_attention_heads * head_dim

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelFlops":
        base = model
        while hasattr(base, "module") and isinstance(base.module, torch.nn.Module):
            base = base.module
        config = base.config
        total = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())  # ds_numel: ZeRO-3 partitions
        embed = base.get_input_embeddings().weight
        head = base.get_output_embeddings()
        head_weight = head.weight if head is not None else None
        n = total - getattr(embed, "ds_numel", embed.numel())
        if head_weight is not None and head_weight is embed:  # tied: the head still multiplies
            n += getattr(head_weight, "ds_numel", head_weight.numel())
        heads = getattr(config, "num_attention_heads")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(matmul_params=int(n), n_layers=int(config.num_hidden_layers), d_attn=int(heads * head_dim))

    def training_flops(self, tokens: int, lengths: Sequence[int]) -> float:
        """FLOPs of forward + backward over `tokens` real tokens in examples of `lengths`."""
        attn = 12 * self.n_layers * self.d_attn * sum(int(n) * int(n) for n in lengths)
        return 6.0 * self.matmul_params * tokens + float(attn)


def mfu(flops: float, seconds: float, processes: int, peak: Optional[float]) -> Optional[float]:
    """Share of `processes` devices' peak that `flops` in `seconds` is; None without a peak."""
    if not peak or seconds <= 0 or processes < 1:
        return None
    return flops / seconds / processes / peak
