"""Attention that never crosses example boundaries, and the model inputs for padded and packed batches.

Packed batches (`medsft.data.packing.PackedCollator`) are one padding-free row with example boundaries. Which
kernel keeps the examples apart depends on `model.attn_implementation` and the hardware:

| requested              | packed batches run with                                                           |
|------------------------|------------------------------------------------------------------------------------|
| sdpa (default)         | `medsft_varlen`: causal sdpa per example (CPU flash kernel / CUDA flash), so the   |
|                        | cost is sum(L_i^2), never the (sum L_i)^2 of a dense block-diagonal mask          |
| flash_attention_2      | flash-attn varlen through `cu_seq_lens_q/k` + `max_length_q/k` (CUDA + flash-attn) |
| flex_attention         | CUDA: FlexAttention with a document BlockMask (cross-example blocks skipped);      |
|                        | CPU: torch 2.13 FlexAttention has no backward there -> `medsft_varlen`, with a     |
|                        | warning                                                                            |
| eager                  | a dense 4D block-diagonal causal mask (for debugging; quadratic in the row)        |

`medsft_varlen` is registered with transformers' AttentionInterface; for padded batches, cached generation
and anything else that is not one flat row it behaves exactly like sdpa (same mask builder, same kernel).
Every packed forward passes `use_cache=False`: with a cache, transformers stops reading packing from the
position ids. Even so, `medsft_varlen` re-derives the boundaries from restarting `position_ids` when no
`cu_seq_lens_q` reaches it, so a caller that forgets them still cannot leak attention across examples.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

VARLEN = "medsft_varlen"
FLASH = ("flash_attention_2", "flash_attention_3")
_registered = False


# ----------------------------------------------------------------------------------------- medsft_varlen


def _segments_from_position_ids(position_ids: torch.Tensor) -> Optional[list[list[tuple[int, int]]]]:
    """Per row, (start, end) of each run of consecutive positions; None when no row restarts (not packed)."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    restarts = torch.diff(position_ids, dim=-1) != 1
    if not bool(restarts.any()):
        return None
    rows = []
    length = position_ids.shape[1]
    for row in restarts.cpu():
        starts = [0] + (torch.nonzero(row).flatten() + 1).tolist()
        rows.append(list(zip(starts, starts[1:] + [length])))
    return rows


def _segment_attention(q, k, v, scaling, dropout_p, window: Optional[int]) -> torch.Tensor:
    """Causal attention of one example: q/k/v [B, H, L, D] (k/v already expanded to H heads)."""
    length = q.shape[2]
    if window is not None and length > window:  # sliding-window layers (Mistral, some Qwen2): explicit band mask
        i = torch.arange(length, device=q.device)
        band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, dropout_p=dropout_p, scale=scaling)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scaling)


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    **kwargs: Any,
):
    """transformers attention function: per-example causal sdpa for packed rows, plain sdpa otherwise.

    query [B, H, T, D], key/value [B, Hkv, T, D]; returns ([B, T, H, D], None) like sdpa_attention_forward.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    segments = None
    if attention_mask is None and q_len == k_len and q_len > 1:
        if cu_seq_lens_q is not None and query.shape[0] == 1:
            bounds = cu_seq_lens_q.tolist() if isinstance(cu_seq_lens_q, torch.Tensor) else list(cu_seq_lens_q)
            if bounds[-1] != q_len:
                raise ValueError(f"cu_seq_lens_q ends at {bounds[-1]} but the packed row has {q_len} tokens")
            segments = [list(zip(bounds[:-1], bounds[1:]))]
        else:
            segments = _segments_from_position_ids(position_ids)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout_p = dropout if module.training else 0.0
    window = getattr(module, "sliding_window", None)
    if len(segments) == 1 and query.is_cuda and window is None and dropout_p == 0.0:
        out = _torch_varlen(query, key, value, segments[0], scaling)
        if out is not None:
            return out, None
    rows = []
    # split (not slicing): its backward is one concatenation, where per-segment slices would each scatter
    # their gradient into a zero-filled tensor of the whole row. Outputs are joined along T already in the
    # [B, T, H, D] layout the caller wants, so there is one copy, not a concatenation plus a transpose.
    q_rows, k_rows, v_rows = (x.split(1, dim=0) if x.shape[0] > 1 else (x,) for x in (query, key, value))
    for b, row_segments in enumerate(segments):
        sizes = [e - s for s, e in row_segments]
        parts = [
            _segment_attention(q, k, v, scaling, dropout_p, window).transpose(1, 2)
            for q, k, v in zip(q_rows[b].split(sizes, dim=2), k_rows[b].split(sizes, dim=2),
                               v_rows[b].split(sizes, dim=2))
        ]
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous())
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out, None


_TORCH_VARLEN_FAILED: list = []


def _torch_varlen(query, key, value, segments, scaling) -> Optional[torch.Tensor]:
    """torch.nn.attention.varlen (flash varlen, CUDA, torch >= 2.9) on a flat row: one kernel for all examples.
    None where unavailable (then the per-example loop runs); the first failure is logged once."""
    if _TORCH_VARLEN_FAILED or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9 only (the range allows 2.4)

        bounds = [segments[0][0]] + [e for _, e in segments]
        cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
        longest = max(e - s for s, e in segments)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
        params = inspect.signature(varlen_attn).parameters
        kwargs = {"scale": scaling}
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)  # causal
        elif "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            raise TypeError("varlen_attn has neither window_size nor is_causal")
        if k.shape[1] != q.shape[1]:
            if "enable_gqa" not in params:
                raise TypeError("varlen_attn without enable_gqa")
            kwargs["enable_gqa"] = True
        out = varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)
        return out[None]  # [1, T, H, D]
    except Exception as err:  # noqa: BLE001 - older torch / unsupported head dim: per-example sdpa instead
        _TORCH_VARLEN_FAILED.append(err)
        log.warning("torch varlen attention unavailable (%s: %s); per-example sdpa instead", type(err).__name__, err)
        return None


def _varlen_mask(**kwargs: Any):
    """Mask builder paired with medsft_varlen: none for a full self-attention forward without a padding mask
    (the attention function applies causality per example), else exactly sdpa's mask."""
    # use_vmap marks extra or/and mask functions (e.g. bidirectional image tokens): keep those as sdpa does
    if (kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
            and not kwargs.get("use_vmap") and not _nonzero(kwargs.get("q_offset"))
            and not _nonzero(kwargs.get("kv_offset"))):
        return None
    return sdpa_mask(**kwargs)


def _nonzero(value: Any) -> bool:
    if value is None:
        return False
    return bool(value != 0) if not isinstance(value, torch.Tensor) else bool((value != 0).any())


def register() -> str:
    """Register `medsft_varlen` with transformers (idempotent); returns its name."""
    global _registered
    if not _registered:
        AttentionInterface.register(VARLEN, varlen_sdpa_attention)
        AttentionMaskInterface.register(VARLEN, _varlen_mask)
        _registered = True
    return VARLEN


# ------------------------------------------------------------------------------------------- model setup


def current_implementation(model: torch.nn.Module) -> str:
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def configure_for_packing(model: torch.nn.Module, requested: str, device: torch.device) -> str:
    """Switch the model to an attention that handles packed rows on this hardware; returns the one in use.

    Call on the unwrapped model before training. Messages say what was chosen and why.
    """
    model = _unwrap(model)
    current = current_implementation(model)
    if current in FLASH:
        log.info("packing: flash-attention varlen (cu_seq_lens) keeps examples apart")
        return current
    if current == "flex_attention" and device.type == "cuda":
        log.info("packing: FlexAttention with a document block mask (cross-example blocks skipped)")
        return current
    if current == "eager":
        log.info("packing with eager attention: dense block-diagonal masks (quadratic in the row; use sdpa)")
        return current
    if current == "flex_attention":
        log.warning("model.attn_implementation=flex_attention cannot train on %s (torch %s FlexAttention has no "
                    "backward there); packing uses medsft_varlen (per-example causal sdpa) instead",
                    device.type, torch.__version__)  # fmt: skip
    elif requested == "flash_attention_2":
        log.warning("flash_attention_2 is unavailable here; packing uses medsft_varlen (per-example causal sdpa)")
    register()
    model.set_attn_implementation(VARLEN)
    log.info("packing: attention %s -> %s (causal sdpa per example: no attention across examples, cost "
             "sum(L_i^2) instead of a dense mask's (sum L_i)^2)", current, VARLEN)  # fmt: skip
    return VARLEN


# ------------------------------------------------------------------------------------------- model inputs


def model_inputs(batch: dict, implementation: str, drop_causal_padding_mask: bool = False) -> dict:
    """Keyword arguments for the model's forward, from a padded or a packed batch (tensors on their device).

    Packed: input_ids + restarting position_ids + the boundary form `implementation` reads; never an all-ones
    attention_mask (it would merge the examples). Padded: input_ids + attention_mask, or, with
    `drop_causal_padding_mask` and a right-padded batch, no mask at all: under causal attention a real token
    never sees the padding AFTER it, and padded positions carry no loss (labels -100 by position), so the
    loss and its gradients are unchanged while sdpa takes its fast causal kernel instead of a dense mask.
    """
    if "cu_seq_lens" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        cu, longest = batch["cu_seq_lens"], int(batch["max_length"])
        if implementation == VARLEN:
            inputs["cu_seq_lens_q"] = cu.cpu()  # read per layer as a Python list: keep it off the GPU
        elif implementation in FLASH:
            cu = cu.to(device=batch["input_ids"].device, dtype=torch.int32)
            inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        elif implementation == "flex_attention":
            inputs["attention_mask"] = document_block_mask(batch["seq_idx"])
        else:  # sdpa / eager / anything else: an explicit 4D block-diagonal causal mask
            inputs["attention_mask"] = dense_block_causal_mask(batch["seq_idx"], implementation)
        return inputs
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if drop_causal_padding_mask and implementation in ("sdpa", VARLEN) and is_right_padded(batch["attention_mask"]):
        del inputs["attention_mask"]
        inputs["use_cache"] = False
    return inputs


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (a prefix of real tokens), which is what SFTCollator produces."""
    if attention_mask.ndim != 2:
        return False
    mask = attention_mask.bool()
    lengths = mask.sum(-1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device)[None]
    return bool(torch.equal(mask, positions < lengths))


def dense_block_causal_mask(seq_idx: torch.Tensor, implementation: str = "sdpa", dtype=torch.float32):
    """[B, 1, T, T] mask: token i sees token j iff same example and j <= i (bool; additive float for eager)."""
    same = seq_idx[:, :, None] == seq_idx[:, None, :]
    length = seq_idx.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seq_idx.device).tril()
    allowed = (same & causal)[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=seq_idx.device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
    return allowed


def document_block_mask(seq_idx: torch.Tensor):
    """FlexAttention BlockMask of a packed row: causal within an example, nothing across (blocks skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask  # torch >= 2.5 only (the range allows 2.4)

    ids = seq_idx[0].to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    length = ids.shape[0]
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=ids.device)


def real_tokens(batch: dict) -> int:
    """Tokens of real examples in a batch (padding and filler excluded)."""
    if "cu_seq_lens" in batch:
        return int(batch["real_tokens"])
    return int(batch["attention_mask"].sum())


def segment_lengths(batch: dict) -> list[int]:
    """Length of every real example in the batch (for attention FLOPs)."""
    if "cu_seq_lens" in batch:
        cu = batch["cu_seq_lens"].tolist()
        return [e - s for s, e in zip(cu[: batch["num_examples"]], cu[1 : batch["num_examples"] + 1])]
    return batch["attention_mask"].sum(-1).tolist()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
