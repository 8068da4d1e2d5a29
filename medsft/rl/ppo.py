"""PPO with a value model and GAE, on top of TRL 1.16's GRPOTrainer (TRL 1.16 ships no PPOTrainer).

HuatuoGPT-o1's stage 2 vendored TRL 0.13's PPOTrainer. That trainer is gone from TRL (no `trl.PPOTrainer`, nothing
in `trl.experimental`), and vendoring ~800 lines of an unmaintained loop is what this project avoids. GRPOTrainer
already does everything PPO needs except the baseline: rollouts, rewards, reference log-probs, the clipped
surrogate over several optimisation passes per rollout batch (`num_iterations` = PPO epochs), checkpoints, resume,
logging; and its loss explicitly accepts per-token advantages of shape (B, T) from subclasses. So PPO here is:

  1. rollouts and rewards from GRPOTrainer (one completion per prompt: rl.num_generations=1);
  2. per-token rewards as TRL 0.13: r_t = -kl_coef * (log pi_old - log pi_ref)_t, plus the verifier score on the
     last completion token (TRL 0.13 put it one position after the stop token, inside the padding; we put it on
     the last real token, the standard formulation);
  3. values V(s_t) from a separate value model (AutoModelForSequenceClassification, num_labels=1, its backbone +
     score head applied at every position, as TRL 0.13's `get_reward`), GAE(gamma, lambda) -> advantages and
     returns; advantages whitened over the completion tokens of the batch (TRL 0.13 `masked_whiten`);
  4. policy loss = GRPOTrainer's clipped surrogate with those (B, T) advantages and no KL loss term (the KL is in
     the reward, so GRPO's `beta` is set to 0 after the reference model is built);
  5. value loss = 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2)) * vf_coef, stepped
     with the policy's accumulation boundaries by the value model's own AdamW (TRL 0.13 shared one optimizer over a
     PolicyAndValueWrapper; GRPOTrainer's model must stay a causal LM for generation, so the value model has its
     own optimizer, same learning-rate schedule). With several processes its gradients are all-reduced (averaged)
     by hand; the value model is replicated on every process, never sharded, also under DeepSpeed ZeRO-3.

Checkpoints: `checkpoint-N/value_model/` (HF format) and `checkpoint-N/value_optimizer.pt` next to the policy, so a
resume restores the critic too. Logged (besides GRPO's): `kl` (per-token, policy vs reference), `ppo/kl_seq`,
`ppo/score_mean`, `ppo/value_mean`, `ppo/returns_mean`, `ppo/advantage_std_raw`, `ppo/vf_loss`, `ppo/vf_clipfrac`;
the policy's clip fraction is GRPO's `clip_ratio/region_mean`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification
from trl.trainer.utils import disable_dropout_in_model


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries (TRL 0.13 `masked_var`)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over completion tokens; (advantages, returns), both (B, T).

    `values` and `rewards` are zero past each completion's end (mask), so the value after the last token is 0.
    """
    values = values * mask
    rewards = rewards * mask
    last = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    T = values.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages + values


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * kl_t on every completion token, plus the sequence score on its last token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rows = torch.arange(rewards.size(0), device=rewards.device)
    has_tokens = mask.sum(dim=1) > 0
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards


def value_head(value_model: Any):
    for name in ("score", "classifier", "v_head"):
        head = getattr(value_model, name, None)
        if head is not None:
            return head
    raise ValueError(f"value model {type(value_model).__name__} has no score/classifier head")


def make_ppo_trainer_class(base: type) -> type:
    """A PPOTrainer class on top of medsft's GRPOTrainer subclass `base`."""

    class PPOTrainer(base):
        def __init__(self, *args, value_model, ppo_cfg, rollout_num_generations: int = 1, **kwargs):
            super().__init__(*args, **kwargs)
            # The real group size (GRPOConfig required >= 2; see trainer.build_grpo_args). Used by the sampler,
            # which is built when train() starts.
            self.num_generations = rollout_num_generations
            self.num_generations_eval = rollout_num_generations
            self.kl_coef = float(self.beta)  # per-token KL penalty inside the reward
            self.beta = 0.0  # ... and no KL term in the loss (the reference model was built because beta > 0)
            self.ppo_cfg = ppo_cfg
            self.gamma, self.lam = float(ppo_cfg.gamma), float(ppo_cfg.lam)
            self.vf_coef, self.cliprange_value = float(ppo_cfg.vf_coef), float(ppo_cfg.cliprange_value)
            self.whiten_rewards = bool(ppo_cfg.whiten_rewards)
            disable_dropout_in_model(value_model)
            value_model.config.pad_token_id = self._tokenizer.pad_token_id
            self.value_model = value_model.to(self.accelerator.device).train()
            value_lr = ppo_cfg.value_learning_rate or self.args.learning_rate
            self._value_lr_ratio = float(value_lr) / float(self.args.learning_rate)
            self.value_optimizer = torch.optim.AdamW(
                self.value_model.parameters(), lr=float(value_lr), weight_decay=self.args.weight_decay
            )

        # ---------------------------------------------------------------- rollouts -> advantages, returns

        def _values(self, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
            """V(s_t) for every completion position t: the value model read at the token before t."""
            vm = self.value_model
            backbone = getattr(vm, vm.base_model_prefix)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            with self.accelerator.autocast():
                hidden = backbone(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
                ).last_hidden_state
                values = value_head(vm)(hidden)[..., 0].float()
            return values[:, -logits_to_keep - 1 : -1]

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode].pop("frac_reward_zero_std", None)  # a group statistic, meaningless here
            ids, attn, keep, mask = _sequences_and_completion_mask(out)
            args = self.args
            batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
            logps = self._get_per_token_logps_and_entropies
            with torch.no_grad():
                old = out.get("old_per_token_logps")
                if old is None:
                    old, _, _ = logps(self.model, ids, attn, keep, batch_size=batch_size)
                if self.kl_coef > 0 and self.ref_model is not None:
                    ref, _, _ = logps(self.ref_model, ids, attn, keep, batch_size=batch_size)
                    kl = (old - ref) * mask
                else:
                    kl = torch.zeros_like(old)
                values = self._values(ids, attn, keep) * mask
                scores = self._last_scores_local.to(values.device)
                rewards = token_rewards(scores, kl, mask, self.kl_coef)
                if self.whiten_rewards:
                    rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
                advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
                raw_std = masked_var(advantages, mask).sqrt()
                advantages = masked_whiten(advantages, mask) * mask
            out["old_per_token_logps"] = old
            out["advantages"] = advantages
            out["old_values"] = values
            out["returns"] = returns
            gather, metrics = self.accelerator.gather, self._metrics[mode]
            tokens = gather(mask.sum()).sum().clamp(min=1)

            def token_mean(x: torch.Tensor) -> float:  # over every completion token of every process
                return (gather((x * mask).sum()).sum() / tokens).item()

            metrics["kl"].append(token_mean(kl))
            metrics["ppo/kl_seq"].append(gather(kl.sum(1)).mean().item())
            metrics["ppo/score_mean"].append(gather(scores.float()).mean().item())
            metrics["ppo/value_mean"].append(token_mean(values))
            metrics["ppo/returns_mean"].append(token_mean(returns))
            metrics["ppo/advantage_std_raw"].append(gather(raw_std.reshape(1)).mean().item())
            return out

        # ---------------------------------------------------------------- losses

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)  # clipped surrogate with (B, T) advantages, beta = 0
            if "returns" not in inputs:
                return loss
            mode = "train" if self.model.training else "eval"
            ids, attn, keep, mask = _sequences_and_completion_mask(inputs)
            train_value = mode == "train" and torch.is_grad_enabled()
            with torch.set_grad_enabled(train_value):
                vpred = self._values(ids, attn, keep)
                old, ret = inputs["old_values"], inputs["returns"]
                vclipped = old + torch.clamp(vpred - old, -self.cliprange_value, self.cliprange_value)
                loss1, loss2 = (vpred - ret) ** 2, (vclipped - ret) ** 2
                vf_loss = 0.5 * masked_mean(torch.max(loss1, loss2), mask)
            if train_value:
                (self.vf_coef * vf_loss / self.current_gradient_accumulation_steps).backward()
                if self.accelerator.sync_gradients:
                    self._value_step()
            with torch.no_grad():
                clipfrac = masked_mean((loss2 > loss1).float(), mask)
                self._metrics[mode]["ppo/vf_loss"].append(self.accelerator.gather(vf_loss.detach()).mean().item())
                self._metrics[mode]["ppo/vf_clipfrac"].append(self.accelerator.gather(clipfrac).mean().item())
            return loss

        def _value_step(self) -> None:
            params = [p for p in self.value_model.parameters() if p.grad is not None]
            if self.accelerator.num_processes > 1 and torch.distributed.is_initialized():
                for p in params:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                    p.grad /= self.accelerator.num_processes
            if self.args.max_grad_norm and self.args.max_grad_norm > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
            if self.lr_scheduler is not None:
                lr = self.lr_scheduler.get_last_lr()[0] * self._value_lr_ratio
                for group in self.value_optimizer.param_groups:
                    group["lr"] = lr
            self.value_optimizer.step()
            self.value_optimizer.zero_grad(set_to_none=True)

        # ---------------------------------------------------------------- checkpoints

        def _save_optimizer_and_scheduler(self, output_dir):
            super()._save_optimizer_and_scheduler(output_dir)
            if self.args.should_save:
                self.value_model.save_pretrained(os.path.join(output_dir, "value_model"))
                torch.save(self.value_optimizer.state_dict(), os.path.join(output_dir, "value_optimizer.pt"))

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is None:
                return
            value_dir = os.path.join(checkpoint, "value_model")
            if not os.path.isdir(value_dir):
                raise FileNotFoundError(f"{checkpoint}: no value_model/ (not a medsft PPO checkpoint)")
            saved = AutoModelForSequenceClassification.from_pretrained(value_dir, dtype=self.value_model.dtype)
            self.value_model.load_state_dict(saved.state_dict())
            state = os.path.join(checkpoint, "value_optimizer.pt")
            if os.path.isfile(state):
                self.value_optimizer.load_state_dict(torch.load(state, map_location=self.accelerator.device))

    return PPOTrainer


def _sequences_and_completion_mask(batch):
    """(prompt+completion ids, their attention mask, completion length, loss mask over the completion)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    mask = batch["completion_mask"].float()
    if "tool_mask" in batch:
        mask = mask * batch["tool_mask"].float()
    return ids, attn, batch["completion_ids"].size(1), mask
