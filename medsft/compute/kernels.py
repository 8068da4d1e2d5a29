"""Optional speed/memory kernels: chunked (fused-linear) cross-entropy, Liger kernels, torch.compile.

* Chunked cross-entropy (`chunked_token_loss_sums`): the loss from the final hidden states and the LM head's
  weight, a chunk of tokens at a time, only on tokens that carry loss. The full [T, V] logits (and their fp32
  copy, log-softmax and gradient: 4 such tensors with a dense loss) never exist; the gradient is computed in
  the same pass and kept at [N, d] + [V, d]. Same sums as `token_loss_sums` (sum of token cross-entropies,
  number of loss tokens, correct argmax predictions) up to float summation order.
* Liger (`model.use_liger_kernel=true`): RMSNorm, RoPE and SwiGLU Triton kernels applied to the model
  instance, when CUDA and the `liger-kernel` package exist; the loss then uses the chunked cross-entropy
  above (it also reports token accuracy, which Liger's fused loss does not). Elsewhere the layer kernels are
  skipped with a message and the chunked cross-entropy is still used, so the flag always means "no full
  logits".
* `model.chunked_loss=true`: the chunked cross-entropy alone, on any device (what Liger implies).
* `model.compile=true`: `torch.compile` of each decoder layer in place (the module tree and state_dict keys
  are untouched, so checkpoints are unchanged), dynamic shapes for varying lengths.

`forward_loss_sums` is the one forward the training loop calls, for padded and packed batches alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

from medsft.compute import attention
from medsft.data.render import IGNORE_INDEX

log = logging.getLogger(__name__)

def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of loss tokens, number of correct argmax predictions).

    Labels are the input ids with -100 where no loss is taken; the shift to next-token prediction happens here.
    Computed in fp32 whatever the model's dtype.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    loss_sum = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    with torch.no_grad():
        correct = ((shift_logits.argmax(-1) == shift_labels) & mask).sum()
    return loss_sum, mask.sum(), correct


# ------------------------------------------------------------------------------------- chunked cross-entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i) over rows, chunked; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, want_grad):
        need_h = want_grad and ctx.needs_input_grad[0]
        need_w = want_grad and ctx.needs_input_grad[1]
        need_b = want_grad and bias is not None and ctx.needs_input_grad[2]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # Autocast would cast the head to its dtype at every product of every chunk (twice a chunk, and not cached
        # for a frozen head): cast once, which is what makes small chunks cheap.
        head = _in_autocast_dtype(weight)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start : start + chunk_tokens]
            t = targets[start : start + chunk_tokens]
            logits = (h @ head.t()).float()
            if bias is not None:
                logits.add_(bias.float())
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            correct = correct + (logits.argmax(-1) == t).sum()
            # log-sum-exp in place over the chunk's fp32 logits (torch.logsumexp would allocate another [chunk,
            # vocab] fp32 temporary); what is left is exp(logits - max), the softmax's numerator
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            sum_exp = exps.sum(dim=-1, keepdim=True)
            lse = (sum_exp.log() + row_max).squeeze(1)
            loss = loss + (lse - target_logits).sum()
            if need_h or need_w or need_b:
                # d(sum CE)/d(logits) = softmax - onehot, built in place
                probs = exps.div_(sum_exp)
                probs.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -1.0))
                g = probs.to(head.dtype if head.dtype != torch.float32 else hidden.dtype)  # autocast's, cast once
                if need_h:
                    grad_h[start : start + chunk_tokens] = g @ head
                if need_w:
                    grad_w.add_((g.t() @ h).float())
                if need_b:
                    grad_b.add_(probs.sum(0))
            del logits, exps
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = list(ctx.saved_tensors)
        grad_h, grad_w, grad_b = (saved.pop(0) if has else None for has in ctx.has)
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.dtypes[0])
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None


def _in_autocast_dtype(weight: torch.Tensor) -> torch.Tensor:
    device = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return weight.to(torch.get_autocast_dtype(device))
    return weight


def chunked_token_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    chunk_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_loss_sums` from final hidden states [B, T, d] and the LM head (weight [V, d], optional bias):
    same next-token shift, same -100 convention, loss in fp32, without materialising [B, T, V] logits."""
    shift_hidden = hidden[:, :-1, :]
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    rows = shift_hidden[mask]  # [N, d]: only tokens that carry loss are projected at all
    targets = shift_labels[mask]
    loss_tokens = mask.sum()
    if rows.shape[0] == 0:  # keep the graph connected (DDP) with an exact zero
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float(), loss_tokens, torch.zeros((), dtype=torch.long)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1 (model.loss_chunk_tokens), got {chunk_tokens}")
    loss, correct = _LinearCrossEntropy.apply(rows, weight, bias, targets, int(chunk_tokens),
                                              torch.is_grad_enabled())
    return loss, loss_tokens, correct


# --------------------------------------------------------------------------------------------- the kernels


@dataclass
class Kernels:
    """What `setup_kernels` decided; `forward_loss_sums` follows it."""

    implementation: str = "sdpa"  # attention implementation in use
    chunked_loss: bool = False
    drop_causal_padding_mask: bool = False
    chunk_tokens: int = 0  # rows a chunk: model.loss_chunk_tokens (setup_kernels); must be set for chunked_loss
    liger: bool = False
    compiled: bool = False


def setup_kernels(model: torch.nn.Module, model_cfg: Any, device: torch.device, packing: bool = False,
                  grouped: bool = False, zero3: bool = False) -> Kernels:
    """Apply the configured kernels to the (unwrapped) model before accelerate.prepare; log what was skipped.

    `grouped` (length-grouped batches) needs nothing beyond the padded path: both are right-padded batches.
    """
    kernels = Kernels(chunk_tokens=int(model_cfg.loss_chunk_tokens))
    requested = model_cfg.attn_implementation
    if packing:
        kernels.implementation = attention.configure_for_packing(model, requested, device)
    else:
        kernels.implementation = attention.current_implementation(model)
    # Right-padded batches under causal sdpa need no padding mask (see attention.model_inputs): same loss and
    # gradients, and sdpa takes its causal kernel instead of a dense masked one (~2x faster attention on CPU).
    kernels.drop_causal_padding_mask = not packing
    liger = bool(model_cfg.use_liger_kernel)
    if liger:
        kernels.liger = apply_liger(model, device)
    if liger or model_cfg.chunked_loss:
        reason = _chunked_loss_unsupported(model, zero3)
        flag = "model.use_liger_kernel" if liger else "model.chunked_loss"
        if reason:
            log.warning("%s: the chunked cross-entropy is skipped (%s); dense logits", flag, reason)
        else:
            kernels.chunked_loss = True
            log.info("loss: chunked linear cross-entropy (%d tokens a chunk; no [T, vocab] logits)",
                     kernels.chunk_tokens)
    if model_cfg.compile:
        kernels.compiled = apply_compile(model)
    return kernels


def apply_liger(model: torch.nn.Module, device: torch.device) -> bool:
    """Liger's RMSNorm/RoPE/SwiGLU kernels on the model instance; False (with the reason logged) if skipped."""
    if device.type != "cuda":
        log.warning("model.use_liger_kernel=true: Liger kernels need CUDA (device here: %s); layer kernels "
                    "skipped, the loss still uses medsft's chunked cross-entropy", device.type)  # fmt: skip
        return False
    try:  # optional (CUDA only), not a dependency
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.warning("model.use_liger_kernel=true: the liger-kernel package is not installed (pip install "
                    "liger-kernel); layer kernels skipped, the loss uses medsft's chunked cross-entropy")
        return False
    try:
        _apply_liger_kernel_to_instance(model=attention._unwrap(model), rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    except Exception as err:  # noqa: BLE001 - unsupported architecture or version: train without them
        log.warning("Liger kernels could not be applied (%s: %s); continuing without them",
                    type(err).__name__, err)  # fmt: skip
        return False
    log.info("Liger kernels applied: RMSNorm, RoPE, SwiGLU")
    return True


def apply_compile(model: torch.nn.Module) -> bool:
    """torch.compile every decoder layer in place (dynamic shapes); the whole model where there are no layers."""
    if not hasattr(torch, "compile"):
        log.warning("model.compile=true: this torch has no torch.compile; skipped")
        return False
    base = attention._unwrap(model)
    layers = getattr(_decoder(base), "layers", None)
    if layers is not None and len(layers):
        for layer in layers:
            layer.compile(dynamic=True)
        log.info("torch.compile: %d decoder layers (first steps are slow while kernels compile)", len(layers))
    else:
        base.compile(dynamic=True)
        log.info("torch.compile: whole model (first steps are slow while kernels compile)")
    return True


def _decoder(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    getter = getattr(model, "get_decoder", None)
    try:
        return getter() if getter is not None else None
    except Exception:  # noqa: BLE001 - models without a decoder accessor
        return None


def _chunked_loss_unsupported(model: torch.nn.Module, zero3: bool) -> Optional[str]:
    base = attention._unwrap(model)
    config = getattr(base, "config", None)
    if zero3:
        return "DeepSpeed ZeRO-3 partitions the LM head outside its forward"
    if _decoder(base) is None or getattr(base, "lm_head", None) is None:
        return f"{type(base).__name__} has no decoder/lm_head pair"
    if hasattr(base.lm_head, "base_layer"):  # a peft tuner layer: its weight alone misses the adapter's update
        return "the LM head carries an adapter (peft.target_modules names it)"
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({name})"
    return None


# ----------------------------------------------------------------------------------------------- forward


def forward_loss_sums(model: torch.nn.Module, batch: dict, kernels: Optional[Kernels] = None):
    """(loss_sum, loss_tokens, correct) of one padded or packed micro-batch, through the configured kernels.

    Without kernels (the default config) this is exactly model(input_ids, attention_mask).logits ->
    token_loss_sums.
    """
    kernels = kernels or Kernels(implementation=attention.current_implementation(model))
    inputs = attention.model_inputs(batch, kernels.implementation, kernels.drop_causal_padding_mask)
    if not kernels.chunked_loss:
        logits = model(**inputs).logits
        return token_loss_sums(logits, batch["labels"])
    base = attention._unwrap(model)
    captured: dict = {}

    def keep_hidden(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = _decoder(base).register_forward_hook(keep_hidden)
    try:
        # No position's logits through the model (an empty index); the LM head is applied below, chunked.
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device))
    finally:
        handle.remove()
    head = base.lm_head
    if isinstance(head.weight, DTensor):
        # FSDP2 resharded the head after its forward: the loss would see this process's rows of it only.
        raise RuntimeError("the chunked loss needs the whole LM head after the forward, but it is sharded (DTensor): "
                           "its FSDP unit must not reshard after forward (medsft.runtime.fsdp keeps it gathered)")
    return chunked_token_loss_sums(captured["hidden"], head.weight, batch["labels"], getattr(head, "bias", None),
                                   chunk_tokens=kernels.chunk_tokens)
