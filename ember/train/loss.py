"""Losses: the contract every objective follows, the language-model objective, and pure loss functions.

The loss contract (what `Trainer` calls, for every objective):

    out = loss_fn(model, batch)    -> LossOutput(loss=SUM over the batch's units, weight=number of units,
                                                 metrics={name: SUM over the same units})
    loss_fn.weight(batch)          -> the same number of units, known before the forward (optional:
                                      `batch_weight` counts non-ignored targets otherwise)

A unit is whatever the objective averages over: a valid target token for language modelling, a
preference pair for DPO, a sequence for a classifier. The Trainer divides by the total weight of the
whole optimizer step (all micro-batches, all data-parallel ranks) before backward, so micro-batches
with different numbers of valid targets (prompt masks, packing, ragged pairs) weigh what they hold,
and reports loss and metrics as weighted means. An optional `loss_fn.report(means)` adds derived
metrics at evaluation (perplexity for the LM objective).

Logits are upcast to fp32 before the softmax (bf16 log-sum-exp loses ~2 digits over a 50k vocab).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F

from ember.errors import EmberError
from ember.train.fused_loss import can_fuse, fused_linear_cross_entropy

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """What an objective returns for one micro-batch."""

    loss: torch.Tensor
    """Scalar: the loss SUMMED over the batch's units (not averaged)."""
    weight: float
    """How many units the sum is over (valid targets, pairs, sequences)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra scalars, each SUMMED over the same units (reported as weighted means)."""


class Objective(Protocol):
    """A loss function the Trainer can normalise exactly (see the module docstring)."""

    def __call__(self, model: torch.nn.Module, batch: Any) -> LossOutput: ...

    def weight(self, batch: Any) -> float: ...


def batch_weight(batch: Any) -> float:
    """Default units of a batch: targets that are not IGNORE_INDEX, for `(inputs, targets)` tuples and
    dicts with "labels"/"targets"; a dict's explicit "weight"; else the batch size (sequences, pairs)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return float((batch[1] != IGNORE_INDEX).sum())
    if isinstance(batch, dict):
        if "weight" in batch:
            return float(batch["weight"])
        for key in ("labels", "targets"):
            if isinstance(batch.get(key), torch.Tensor) and not batch[key].is_floating_point():
                return float((batch[key] != IGNORE_INDEX).sum())
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        if first is not None:
            return float(first.shape[0])
    if isinstance(batch, torch.Tensor):
        return float(batch.shape[0])
    raise TypeError(f"cannot count the units of a {type(batch).__name__} batch; give the loss_fn a .weight(batch)")


@dataclass
class LossConfig:
    """The language-model training objective."""

    fused: bool = True
    """Compute the output head and cross-entropy together, chunk by chunk, never materialising the logits
    (train/fused_loss.py; the same values to fp32 rounding). DDP/FSDP2-wrapped models and z-loss use the
    plain logits path automatically."""
    z_loss: float = 0.0
    """Coefficient of the z-loss (PaLM) added to the training loss; 0 = off."""


class LMLoss:
    """Next-token cross-entropy (pretraining, SFT): units are targets that are not -100.

    Batches: `(inputs, targets)` tuples, or dicts {"input_ids", "labels"} with optional "positions"
    and "attn_mask" (packed SFT rows: positions restart per document, block-diagonal attention)."""

    def __init__(self, cfg: Optional[LossConfig] = None):
        self.cfg = cfg or LossConfig()

    @property
    def loss_parallel(self) -> bool:
        """Under tensor parallelism the logits may stay vocab-sharded (plain cross-entropy only)."""
        return not self.cfg.z_loss

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if isinstance(batch, dict):
            kw = {k: batch[k] for k in ("positions", "attn_mask") if batch.get(k) is not None}
            return batch["input_ids"], batch["labels"], kw
        return batch[0], batch[1], {}

    def weight(self, batch: Any) -> float:
        return float((self._unpack(batch)[1] != IGNORE_INDEX).sum())

    def pipeline_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(inputs, targets, loss_sum(logits, targets)) for a pipeline schedule: the last stage's logits
        go through `loss_sum`, the summed cross-entropy (the Trainer divides by the step's weight)."""
        inputs, targets, kw = self._unpack(batch)
        if kw or self.cfg.z_loss:
            raise EmberError("pipeline parallelism: packed rows (positions / attention masks) and z-loss are not "
                             "supported under --parallel.pp. HINT: pad instead of packing, or drop --loss.z-loss")
        return inputs, targets, lambda logits, tg: cross_entropy(logits, tg, reduction="sum")

    def __call__(self, model: torch.nn.Module, batch: Any) -> LossOutput:
        inputs, targets, kw = self._unpack(batch)
        if self.cfg.fused and not self.cfg.z_loss:
            loss = model_loss(model, inputs, targets, reduction="sum", **kw)
        else:
            logits = model(inputs, **kw)  # (B, T, V)
            loss = cross_entropy(logits, targets, reduction="sum")
            if self.cfg.z_loss:
                loss = loss + self.cfg.z_loss * z_loss(logits, targets, reduction="sum")
        return LossOutput(loss, self.weight(batch))

    @staticmethod
    def report(means: dict) -> dict:
        return {**means, "ppl": math.exp(min(means["loss"], 50.0))}


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy over the non-ignored targets (nats).

    logits: (B, T, V) or (N, V), any float dtype (upcast to fp32).
    targets: (B, T) or (N,) int64; positions equal to `ignore_index` do not count.
    reduction: "mean" (over counted tokens) or "sum".
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`cross_entropy` computed over row chunks, so the fp32 copy of the logits is never whole.

    Same value as `cross_entropy` (mean over counted tokens); useful for large vocabularies.
    """
    V = logits.shape[-1]
    flat_logits, flat_targets = logits.reshape(-1, V), targets.reshape(-1)  # (N, V), (N,)
    total = flat_logits.new_zeros((), dtype=torch.float32)
    for lg, tg in zip(flat_logits.split(chunk_size), flat_targets.split(chunk_size)):
        total = total + F.cross_entropy(lg.float(), tg, ignore_index=ignore_index, reduction="sum")
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return total / count


def z_loss(logits: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
           reduction: str = "mean") -> torch.Tensor:
    """Mean (or "sum") squared log-partition log(sum exp(logits))^2 (PaLM, arXiv:2204.02311 sec. 5).

    Add `coef * z_loss(logits)` (coef ~1e-4) to keep the softmax normaliser near 1. With `targets`,
    ignored positions do not count.
    """
    V = logits.shape[-1]
    lse = torch.logsumexp(logits.reshape(-1, V).float(), dim=-1)  # (N,)
    sq = lse.square()
    if targets is None:
        return sq.sum() if reduction == "sum" else sq.mean()
    keep = (targets.reshape(-1) != ignore_index).float()
    total = (sq * keep).sum()
    return total if reduction == "sum" else total / keep.sum().clamp(min=1)


def model_loss(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
               ignore_index: int = IGNORE_INDEX, chunk_size: Optional[int] = None, reduction: str = "mean",
               **forward_kwargs) -> torch.Tensor:
    """Next-token cross-entropy ("mean" or "sum") of an ember Transformer, without materialising its logits.

    Equals `cross_entropy(model(tokens, **forward_kwargs), targets)` (forward_kwargs as in
    `Transformer.forward`: positions, prefix_len, attn_mask). When `can_fuse(model)` is False
    (DDP, FSDP2 root, whole-model compile) it is exactly that plain path.
    """
    if not can_fuse(model):
        return cross_entropy(model(tokens, **forward_kwargs), targets, ignore_index=ignore_index, reduction=reduction)
    hidden = model.hidden_states(tokens, **forward_kwargs)  # (B, T, C), after the final norm
    return fused_linear_cross_entropy(hidden, model.output.weight, targets, ignore_index=ignore_index,
                                      reduction=reduction, chunk_size=chunk_size)


def pooled_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The head's output at each sequence's last real token (batch["last"]): (B, n_out). Padding is
    never pooled. A plain model applies its head to those positions only."""
    ids, last = batch["input_ids"], batch["last"]
    rows = torch.arange(ids.shape[0], device=ids.device)
    if can_fuse(model):
        return model.output(model.hidden_states(ids)[rows, last])
    return model(ids)[rows, last]


class ClassifierLoss:
    """Cross-entropy over classes at the last real token; units are sequences; metric: accuracy."""

    @staticmethod
    def weight(batch: dict) -> float:
        return float(batch["labels"].shape[0])

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        logits = pooled_logits(model, batch).float()  # (B, N)
        labels = batch["labels"]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).float().sum()
        return LossOutput(loss, self.weight(batch), {"accuracy": correct.detach()})


# ------------------------------------------------------------------------------------ preferences
def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(label_t) under logits (B, T, V) (in fp32; 0 where labels are -100)."""
    picked = torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (labels != IGNORE_INDEX)


def token_logps(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) log p(label_t | ids_<=t) (0 where labels are -100)."""
    return label_logps(model(ids), labels)


def sequence_logps(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum over each row of log p(label_t | ids_<=t), labels -100 not counted (completion tokens only)."""
    return token_logps(model, ids, labels).sum(-1)


def reference_pass(model: torch.nn.Module, reference: Optional[torch.nn.Module], fn):
    """fn(reference) without gradients; with no reference model, fn(model) with its LoRA adapters disabled
    (the reference without a second copy in memory)."""
    with torch.no_grad():
        if reference is not None:
            return fn(reference)
        from ember.peft.lora import adapters_disabled, has_lora

        if not has_lora(model):
            raise ValueError("no reference model, and the policy has no LoRA adapters to disable for one")
        with adapters_disabled(model):
            return fn(model)


def pair_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) completion log-probs, in one forward over the 2B rows."""
    B = batch["chosen_ids"].shape[0]
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    lp = sequence_logps(model, ids, labels)
    return lp[:B], lp[B:]


@dataclass
class DPOConfig:
    """Direct preference optimisation (arXiv:2305.18290) and its variants."""

    beta: float = 0.1
    """Strength of the implicit KL to the reference (the rewards are beta * log-ratio)."""
    loss: str = "sigmoid"
    """sigmoid (DPO), ipo (arXiv:2310.12036), hinge (SLiC), robust (arXiv:2403.00409)."""
    label_smoothing: float = 0.0
    """cDPO / robust DPO: the assumed fraction of flipped preference labels."""

    def __post_init__(self) -> None:
        if self.loss not in ("sigmoid", "ipo", "hinge", "robust"):
            raise ValueError(f"dpo.loss={self.loss!r}: expected sigmoid, ipo, hinge or robust")
        if not self.beta > 0:
            raise ValueError(f"dpo.beta={self.beta}: expected > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing}: expected a fraction in [0, 0.5)")


def dpo_losses(cfg: DPOConfig, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from policy / reference log-probs (B,) each."""
    logits = (pc - pr) - (rc - rr)
    b, ls = cfg.beta, cfg.label_smoothing
    if cfg.loss == "sigmoid":
        losses = -F.logsigmoid(b * logits) * (1 - ls) - F.logsigmoid(-b * logits) * ls
    elif cfg.loss == "robust":
        losses = (-F.logsigmoid(b * logits) * (1 - ls) + F.logsigmoid(-b * logits) * ls) / (1 - 2 * ls)
    elif cfg.loss == "hinge":
        losses = torch.relu(1 - b * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * b)) ** 2
    return losses, b * (pc - rc).detach(), b * (pr - rr).detach()


class DPOLoss:
    """The DPO family over preference batches (ember.data.pref.pair_batch); units are pairs.

    `reference`: a frozen model (the Trainer's `frozen["reference"]`), or None: the policy itself with
    its LoRA adapters disabled (no second copy in memory). Metrics are named as TRL names them."""

    def __init__(self, cfg: DPOConfig, reference: Optional[torch.nn.Module] = None):
        self.cfg, self.reference = cfg, reference

    @staticmethod
    def weight(batch: dict) -> float:
        return float(batch["chosen_ids"].shape[0])

    def reference_logps(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_pass(model, self.reference, lambda m: pair_logps(m, batch))

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        rc, rr = self.reference_logps(model, batch)
        pc, pr = pair_logps(model, batch)
        losses, cr, rj = dpo_losses(self.cfg, pc, pr, rc, rr)
        metrics = {"rewards/chosen": cr.sum(), "rewards/rejected": rj.sum(), "rewards/margins": (cr - rj).sum(),
                   "rewards/accuracies": (cr > rj).float().sum(), "logps/chosen": pc.detach().sum(),
                   "logps/rejected": pr.detach().sum()}
        return LossOutput(losses.sum(), self.weight(batch), metrics)


@dataclass
class RewardConfig:
    """Bradley-Terry reward model: -log sigmoid(r_chosen - r_rejected - margin)."""

    margin: float = 0.0
    """A margin the chosen reward must beat the rejected one by (Llama-2's margin loss)."""
    center: float = 0.0
    """Reward centering coefficient: adds center * (r_chosen + r_rejected)^2 (keeps rewards near 0)."""


class RewardLoss:
    """Pairwise Bradley-Terry loss of a scalar head (Transformer(cfg, n_out=1)) at each sequence's last real
    token (ember.data.pref.reward_batch: padding is never pooled); units are pairs; metrics accuracy, margin."""

    def __init__(self, cfg: Optional[RewardConfig] = None):
        self.cfg = cfg or RewardConfig()

    @staticmethod
    def weight(batch: dict) -> float:
        return float(batch["chosen_ids"].shape[0])

    @staticmethod
    def rewards(model: torch.nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return pooled_logits(model, {"input_ids": ids, "last": last}).float().squeeze(-1)  # (B,)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        B = batch["chosen_ids"].shape[0]
        rc = self.rewards(model, batch["chosen_ids"], batch["chosen_last"])
        rr = self.rewards(model, batch["rejected_ids"], batch["rejected_last"])
        losses = -F.logsigmoid(rc - rr - self.cfg.margin)
        if self.cfg.center:
            losses = losses + self.cfg.center * (rc + rr) ** 2
        return LossOutput(losses.sum(), float(B), {"accuracy": (rc > rr).float().sum(),
                                                   "margin": (rc - rr).detach().sum(),
                                                   "rewards/chosen": rc.detach().sum(),
                                                   "rewards/rejected": rr.detach().sum()})


# ------------------------------------------------------------------------------------ online RL
@dataclass
class GRPOConfig:
    """Group-relative policy optimisation (DeepSeekMath, arXiv:2402.03300)."""

    group_size: int = 4
    """Completions sampled per prompt (G); advantages are relative within each group."""
    epsilon: float = 0.2
    """Clip range of the probability ratio."""
    beta: float = 0.0
    """Weight of the KL to the reference (k3 estimator); 0 = no KL term (and no reference pass)."""
    aggregation: str = "token"
    """token: every completion token weighs the same; sequence: every completion does (mean over its tokens)."""
    std_eps: float = 1e-4
    """Added to the group std before dividing (a zero-std group gets advantage 0)."""
    algo: str = "grpo"
    """grpo: group-relative advantages; ppo: a value head on the policy's body and GAE advantages."""
    gamma: float = 1.0
    """PPO: discount of the per-token rewards."""
    lam: float = 0.95
    """PPO: GAE lambda."""
    vf_coef: float = 0.1
    """PPO: weight of the value loss."""
    cliprange_value: float = 0.2
    """PPO: clip range of the value prediction around its rollout-time value."""

    def __post_init__(self) -> None:
        if self.algo not in ("grpo", "ppo"):
            raise ValueError(f"rl.algo={self.algo!r}: expected grpo or ppo")
        if self.group_size < 2:
            raise ValueError(f"rl.group_size={self.group_size}: expected at least 2 completions per prompt")
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"rl.aggregation={self.aggregation!r}: expected token or sequence")
        if not 0 < self.epsilon < 1 or self.beta < 0:
            raise ValueError(f"rl.epsilon={self.epsilon}, rl.beta={self.beta}: expected 0 < epsilon < 1, beta >= 0")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std (unbiased) + eps), rows grouped in consecutive runs of group_size."""
    r = rewards.view(-1, group_size).double()
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return adv.view(-1).to(rewards.dtype)


def clipped_objective(ratio: torch.Tensor, adv: torch.Tensor, eps: float, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss -min(ratio A, clip(ratio) A), the fraction of tokens where the clip binds)."""
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    clipped = (((ratio < 1 - eps) & (adv < 0)) | ((ratio > 1 + eps) & (adv > 0))).float() * mask
    return loss, (clipped.sum() / mask.sum().clamp(min=1)).detach()


class GRPOLoss:
    """The clipped-ratio policy-gradient objective over rollout batches (ember.train.rollouts).

    batch: "input_ids" (B, T) prompt + completion, "labels" (B, T) the completion tokens (else -100),
    "advantages" (B,), optional "old_logps" (B, T) (default: this policy's own, detached: one update per
    rollout, so the ratio is 1 and the gradient is advantage x grad log p), and per-completion stats.
    With beta > 0 the k3 KL to `reference` (a frozen model, or None: the policy with its adapters
    disabled) is added per token. The loss stays near 0 by construction (advantages are zero-mean per
    group; exactly 0 at the first step with sequence aggregation): learning shows in the rewards."""

    def __init__(self, cfg: GRPOConfig, reference: Optional[torch.nn.Module] = None):
        self.cfg, self.reference = cfg, reference

    def weight(self, batch: dict) -> float:
        if self.cfg.aggregation == "sequence":
            return float(batch["labels"].shape[0])
        return float((batch["labels"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        ids, labels, adv = batch["input_ids"], batch["labels"], batch["advantages"]
        mask = (labels != IGNORE_INDEX).float()
        logp = token_logps(model, ids, labels)
        old = batch.get("old_logps")
        old = logp.detach() if old is None else old
        ratio = torch.exp(logp - old)
        per_token, clip_fraction = clipped_objective(ratio, adv.to(logp.dtype).unsqueeze(1), self.cfg.epsilon, mask)
        kl = torch.zeros_like(logp)
        if self.cfg.beta:
            ref = reference_pass(model, self.reference, lambda m: token_logps(m, ids, labels))
            kl = torch.exp(ref - logp) - (ref - logp) - 1  # k3: unbiased, >= 0
            per_token = per_token + self.cfg.beta * kl
        n_tok = mask.sum(1).clamp(min=1)  # (B,)
        w = self.weight(batch)
        metrics = {"kl": ((kl * mask).sum(1) / n_tok).mean().detach() * w, "clip_fraction": clip_fraction * w}
        return LossOutput(self._aggregate(per_token, mask), w, self._stats(batch, w, metrics))

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss summed over tokens, or over completions of their token means (aggregation)."""
        if self.cfg.aggregation == "sequence":
            return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()
        return (per_token * mask).sum()

    @staticmethod
    def _stats(batch: dict, w: float, metrics: dict) -> dict:
        """Per-step means whatever the units: each metric is its mean times the batch's weight."""
        for k in ("reward", "reward_std", "zero_std_groups", "completion_length"):
            if k in batch:
                metrics[k] = batch[k].float().mean() * w
        return metrics


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens (mask (B, T), contiguous):
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last token), A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), both 0 outside the mask."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    nxt_v = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    nxt_a = torch.zeros_like(nxt_v)
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        a = delta + gamma * lam * nxt_a
        adv[:, t] = a * m
        nxt_v = torch.where(m > 0, values[:, t], nxt_v)
        nxt_a = torch.where(m > 0, a, nxt_a)
    return adv, (adv + values) * mask


def values_of(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), values (B, T)) from one pass of the body: the LM head and the value head."""
    h = model.hidden_states(ids)
    return model.output(h), model.value_head(h).squeeze(-1).float()


class PPOLoss(GRPOLoss):
    """PPO with a value head on the policy's body (`model.value_head`, added by the recipe): per-token
    GAE advantages (whitened over the batch), the clipped-ratio objective and a clipped value loss.
    The KL to the reference enters the per-token rewards (-beta (log p - log p_ref)), not the loss.

    `prepare(model, batch)` runs at rollout time (no grad): it adds "old_logps", "old_values",
    "advantages" (B, T) and "returns" (B, T) to the rollout batch from its per-completion "reward"."""

    def prepare(self, model: torch.nn.Module, batch: dict) -> dict:
        ids, labels = batch["input_ids"], batch["labels"]
        mask = (labels != IGNORE_INDEX).float()
        with torch.no_grad():
            logits, values = values_of(model, ids)
            logp = label_logps(logits, labels)
            rewards = torch.zeros_like(logp)
            if self.cfg.beta:
                ref = reference_pass(model, self.reference, lambda m: token_logps(m, ids, labels))
                rewards = -self.cfg.beta * (logp - ref) * mask
            last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # each row's last token
            rewards[torch.arange(len(last)), last] += batch["reward"].to(rewards.dtype)
            values = values * mask
            adv, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
            sel = mask > 0
            mean, std = adv[sel].mean(), adv[sel].std()
            adv = (adv - mean) / (std + 1e-8) * mask
        return {**batch, "old_logps": logp, "old_values": values, "advantages": adv, "returns": returns}

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        ids, labels = batch["input_ids"], batch["labels"]
        mask = (labels != IGNORE_INDEX).float()
        logits, values = values_of(model, ids)
        ratio = torch.exp(label_logps(logits, labels) - batch["old_logps"])
        pg, clip_fraction = clipped_objective(ratio, batch["advantages"], self.cfg.epsilon, mask)
        old_v, ret, cv = batch["old_values"], batch["returns"], self.cfg.cliprange_value
        v_clip = old_v + (values - old_v).clamp(-cv, cv)
        vf = 0.5 * torch.maximum((values - ret) ** 2, (v_clip - ret) ** 2)
        w = self.weight(batch)
        metrics = {"value_loss": ((vf * mask).sum() / mask.sum().clamp(min=1)).detach() * w,
                   "clip_fraction": clip_fraction * w}
        return LossOutput(self._aggregate(pg + self.cfg.vf_coef * vf, mask), w, self._stats(batch, w, metrics))
