"""The PPO RLHF baseline: a KL-penalised actor-critic on the same backbones, data and evaluation.

Each PPO iteration (one Lightning ``training_step``, manual optimisation):

1. **Rollout.** ``rollout_batch_size`` of the task's training prompts, one sample each from the
   policy (``sampling/engine.generate``, per-prompt seeds, so a resumed run samples the same).
2. **Score.** r(x, y) from the task's gold reward or a learned reward model (``reward_source``).
3. **Per-token quantities** through ``models/logprobs.py``: log pi_old and values (one forward of
   the policy; the value head reads its last hidden states, or a separate critic's), log pi_ref
   (a frozen copy, or the policy with its LoRA adapters switched off).
4. **Rewards and advantages**: r_t = -beta (log pi_old - log pi_ref) + [t = T] r(x, y) (the
   proposal's Eq. 9 spread over tokens, Ziegler et al. 2019), GAE, whitened advantages.
5. **Updates**: ``ppo_epochs`` passes over ``n_minibatches`` minibatches of the clipped surrogate plus
   ``vf_coef`` times the clipped value loss (``losses/ppo.py``); then the KL controller updates beta.

Logged every iteration (``ppo/...``): score, kl (to the reference, per sequence), kl_coef, entropy,
clipfrac, approx_kl (old vs new policy), loss_policy, loss_value, explained_variance, response_length.
Safety nets: a NaN or infinite loss or KL, or a KL past ``max_kl``, stops the run with a message that
names the setting; a checkpoint (policy, value head or critic, optimizer, scheduler, KL controller,
RNG states, iteration, history) every ``checkpoint_every`` iterations resumes exactly (``resume_from``).
Single device (DDP would need each rank to take its own share of the prompts; not done).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from alignexp.losses import get_loss
from alignexp.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_penalised_rewards,
    masked_mean,
    whiten,
)
from alignexp.models.logprobs import (
    EncodedExample,
    PackedBatch,
    encode_text,
    pack,
    response_states,
    token_logps,
)
from alignexp.models.lora import AdaptersOff, is_peft
from alignexp.modules.preference import OptimArgs
from alignexp.sampling.engine import SamplingParams, generate
from alignexp.sampling.text import decode, sample_seed
from alignexp.tasks.base import Text

log = logging.getLogger(__name__)

REWARD_SOURCES = ("gold", "reward_model")
VALUE_MODELS = ("head", "critic")
REFERENCES = ("frozen", "lora_off")


@dataclass
class PPOArgs:
    """The PPO stage's settings: exactly the keys of ``conf/loss/ppo.yaml`` (the ``ppo`` loss's
    keyword arguments, see :func:`alignexp.losses.ppo.ppo_loss`). Invalid values raise ValueError
    naming ``loss.<key>``."""

    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.1
    adaptive_kl: bool = True
    target_kl: float = 6.0
    horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    rollout_batch_size: int = 64
    ppo_epochs: int = 4
    n_minibatches: int = 4
    steps: int = 60
    temperature: float = 1.0
    max_new_tokens: int = 32
    reward_source: str = "gold"
    reward_model_path: str | None = None
    offload_reward_model: bool = False
    value_model: str = "head"
    reference: str = "frozen"
    max_kl: float = 100.0
    checkpoint_every: int = 10
    resume_from: str | None = None

    def __post_init__(self) -> None:
        def fail(key: str, requirement: str) -> None:
            raise ValueError(f"loss.{key} must be {requirement}, got {getattr(self, key)!r}")

        for key in ("clip_range", "clip_range_value", "target_kl", "temperature", "max_kl"):
            if not _number(getattr(self, key)) or getattr(self, key) <= 0:
                fail(key, "a number > 0")
        for key in ("vf_coef", "kl_coef"):
            if not _number(getattr(self, key)) or getattr(self, key) < 0:
                fail(key, "a number >= 0")
        for key in ("gamma", "lam"):
            if not _number(getattr(self, key)) or not 0 <= getattr(self, key) <= 1:
                fail(key, "in [0, 1]")
        for key in ("horizon", "rollout_batch_size", "ppo_epochs", "n_minibatches", "steps", "max_new_tokens"):
            if not _integer(getattr(self, key)) or getattr(self, key) < 1:
                fail(key, "an integer >= 1")
        if not _integer(self.checkpoint_every) or self.checkpoint_every < 0:
            fail("checkpoint_every", "an integer >= 0 (0: only at the end)")
        if self.n_minibatches > self.rollout_batch_size:
            fail("n_minibatches", f"<= loss.rollout_batch_size ({self.rollout_batch_size})")
        for key in ("adaptive_kl", "whiten_advantages", "offload_reward_model"):
            if not isinstance(getattr(self, key), bool):
                fail(key, "true or false")
        for key, options in (("reward_source", REWARD_SOURCES), ("value_model", VALUE_MODELS),
                             ("reference", REFERENCES)):
            if getattr(self, key) not in options:
                fail(key, f"one of {', '.join(options)}")
        if self.reward_source == "reward_model" and not self.reward_model_path:
            raise ValueError("loss.reward_source=reward_model needs loss.reward_model_path (a reward model folder)")
        if self.resume_from is not None and not Path(self.resume_from).is_file():
            raise ValueError(f"loss.resume_from={self.resume_from}: no such checkpoint file")

    @classmethod
    def from_hparams(cls, hparams: dict[str, Any]) -> PPOArgs:
        """From the ``loss`` config group (its ``name`` key ignored); unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(hparams) - known - {"name"})
        if unknown:
            raise ValueError(f"loss.{unknown[0]} is not a setting of loss 'ppo' (it takes: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in hparams.items() if k != "name"})


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PPOInstabilityError(RuntimeError):
    """PPO diverged: a NaN or infinite loss or KL, or a KL to the reference past ``loss.max_kl``."""


# ------------------------------------------------------------------------------------------ scoring


Scorer = Callable[[Sequence[Text], Sequence[str], Sequence[Sequence[int]], Sequence[Sequence[int]]], Tensor]
"""``scorer(prompts, responses, prompt_ids, response_ids) -> (B,)`` rewards r(x, y) on the CPU."""


class GoldScorer:
    """The task's gold reward r*(x, y) (the synthetic task has one)."""

    def __init__(self, task: Any):
        if not getattr(task, "has_gold_reward", False):
            raise ValueError(f"loss.reward_source=gold: task '{task.name}' has no gold reward; "
                             f"use loss.reward_source=reward_model with loss.reward_model_path")
        self.reward_fn = task.gold_reward

    def __call__(self, prompts, responses, prompt_ids, response_ids) -> Tensor:
        return torch.tensor([float(self.reward_fn(p, r)) for p, r in zip(prompts, responses)])

    def to(self, device: torch.device | str) -> GoldScorer:
        return self


class RewardModelScorer:
    """A learned reward model (``loss=reward``'s output folder, read by
    :func:`alignexp.judges.reward_model.load_reward_model`), scoring the decoded responses through
    :class:`~alignexp.judges.reward_model.RewardModelJudge` (its own tokenizer, its ``reward_offset``).
    With ``offload``, the model waits on the CPU and visits the policy's device only while it scores
    a rollout (one model's memory less during the PPO updates)."""

    def __init__(self, path: str, offload: bool = False, batch_size: int = 64, max_prompt_len: int = 512,
                 max_response_len: int = 256):
        from alignexp.judges.reward_model import RewardModelJudge, load_reward_model

        try:
            model, tokenizer = load_reward_model(path)
        except (RuntimeError, OSError, ValueError) as error:
            raise ValueError(f"loss.reward_model_path={path}: no reward model could be loaded: {error}") from None
        self.judge = RewardModelJudge(model=model, tokenizer=tokenizer, batch_size=batch_size,
                                      max_prompt_len=max_prompt_len, max_response_len=max_response_len)
        self.offload = offload
        self.device: torch.device | str = "cpu"

    def to(self, device: torch.device | str) -> RewardModelScorer:
        self.device = device
        if not self.offload:
            self.judge.model.to(device)
        return self

    def __call__(self, prompts, responses, prompt_ids, response_ids) -> Tensor:
        if self.offload:
            self.judge.model.to(self.device)
        try:
            return torch.tensor(self.judge.score(prompts, responses))
        finally:
            if self.offload:
                self.judge.model.to("cpu")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ the module


class ValueHead(nn.Module):
    """V(s) = w . h + b on a backbone's last hidden state h (zero-initialised: V = 0 at the start)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, states: Tensor) -> Tensor:
        """(N, H) -> (N,) in fp32."""
        return self.linear(states.float()).squeeze(-1)


@dataclass
class Rollout:
    """One iteration's samples and their per-token quantities, (B, T) right-padded with ``mask``."""

    encoded: list[EncodedExample]
    mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    rewards: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor

    def rows(self, index: Tensor) -> tuple[list[EncodedExample], dict[str, Tensor]]:
        """The examples ``index`` and their per-token tensors, cut to their longest response."""
        mask = self.mask[index]
        width = int(mask.sum(dim=1).max())
        tensors = {name: getattr(self, name)[index][:, :width]
                   for name in ("mask", "logprobs", "values", "advantages", "returns")}
        return [self.encoded[i] for i in index.tolist()], tensors


def to_rows(flat: Tensor, batch: PackedBatch, mask: Tensor) -> Tensor:
    """Per-token values (N,) of a packed batch with one response per prompt -> (B, T) right-padded.

    Tokens are put in order by (response, position): ``slot``, then ``source_index`` (which grows
    along a response), so the result does not depend on the order the packer lists them in.
    """
    order = torch.argsort(batch.slot * batch.input_ids.numel() + batch.source_index)
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat[order])


class PromptSchedule(Dataset):
    """Item i is PPO iteration ``first + i``: its index and its prompts (a seeded draw without
    replacement from the task's training prompts), so a resumed run sees the same prompts."""

    def __init__(self, n_prompts: int, batch_size: int, first: int, last: int, seed: int):
        self.n_prompts, self.batch_size, self.first, self.last, self.seed = n_prompts, batch_size, first, last, seed

    def __len__(self) -> int:
        return max(0, self.last - self.first)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        iteration = self.first + index
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        prompts = torch.randperm(self.n_prompts, generator=generator)[:self.batch_size]
        return {"iteration": torch.tensor(iteration), "prompt_index": prompts}


class PPOModule(L.LightningModule):
    """PPO with manual optimisation (see the module docstring). The reference is ``reference``, frozen
    (``args.reference=frozen``), or the PEFT policy with its adapters switched off (``lora_off``:
    :class:`~alignexp.models.lora.AdaptersOff`; ``reference`` is then ignored and may be None)."""

    def __init__(self, policy: nn.Module, reference: nn.Module | None, tokenizer, prompts: Sequence[Text],
                 scorer: Scorer, args: PPOArgs, optim: OptimArgs | None = None,
                 max_grad_norm: float | None = 1.0, seed: int = 0, max_prompt_len: int = 512):
        super().__init__()
        self.automatic_optimization = False
        self.args, self.optim = args, optim or OptimArgs()
        self.policy = policy
        policy.train()
        if args.reference == "frozen":
            if reference is None:
                raise ValueError("loss.reference=frozen needs a reference model")
            self.reference = reference.requires_grad_(False).eval()
        else:
            if not is_peft(policy):
                raise ValueError("loss.reference=lora_off needs a LoRA (PEFT) policy; set model.lora, "
                                 "or use loss.reference=frozen")
            self.reference = AdaptersOff(policy)
        hidden = policy.get_output_embeddings().in_features
        self.critic = copy.deepcopy(policy).train() if args.value_model == "critic" else None
        self.value_head = ValueHead(hidden)
        self.tokenizer, self.prompts, self.scorer = tokenizer, list(prompts), scorer
        self.max_grad_norm, self.seed, self.max_prompt_len = max_grad_norm, seed, max_prompt_len
        self.kl_ctl: FixedKLController = (AdaptiveKLController(args.kl_coef, args.target_kl, args.horizon)
                                          if args.adaptive_kl else FixedKLController(args.kl_coef))
        self.loss_fn = get_loss("ppo")
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.checkpoint_path: Path | None = None
        self._pending: dict[str, Any] | None = None  # optimizer/scheduler/RNG states to restore at train start

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        return self

    # -- forward passes --------------------------------------------------------------------------
    def forward_policy(self, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        """Per-token log pi (N,) and values (N,): one policy forward (two with a separate critic)."""
        states = response_states(self.policy, batch)
        logps = token_logps(self.policy, batch, states)
        if self.critic is not None:
            states = response_states(self.critic, batch)
        return logps, self.value_head(states)

    # -- one iteration ---------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, iteration: int, prompt_index: Sequence[int]) -> tuple[Rollout, dict[str, float]]:
        """Sample, score and compute rewards and advantages for the prompts ``prompt_index``."""
        args, tokenizer = self.args, self.tokenizer
        prompts = [self.prompts[i] for i in prompt_index]
        prompt_ids = [encode_text(tokenizer, p, is_prompt=True)[-self.max_prompt_len:] for p in prompts]
        seeds = [sample_seed(self.seed * 1_000_003 + iteration, i, 0) for i in prompt_index]
        params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
        generations = generate(self.policy, prompt_ids, params, eos_id=tokenizer.eos_token_id,
                               pad_id=tokenizer.pad_token_id, seeds=seeds, batch_size=args.rollout_batch_size)
        response_ids = [g.token_ids for g in generations]
        scores = self.scorer(prompts, [decode(tokenizer, g) for g in generations], prompt_ids, response_ids)
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise PPOInstabilityError(f"PPO stopped at iteration {iteration}: the reward is not finite for {bad} of "
                                      f"{len(scores)} responses (loss.reward_source={args.reward_source})")
        encoded = [EncodedExample(p, [r]) for p, r in zip(prompt_ids, response_ids)]
        batch = pack(encoded, n=1, pad_id=tokenizer.pad_token_id).to(self.device)
        mask = _response_mask(batch)
        logps, values = self.forward_policy(batch)
        logprobs, values = to_rows(logps, batch, mask), to_rows(values, batch, mask)
        ref_logprobs = to_rows(token_logps(self.reference, batch), batch, mask)
        scores = scores.to(self.device, logprobs.dtype)
        rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask)
        rollout = Rollout(encoded, mask, logprobs, ref_logprobs, values, rewards, advantages, returns, scores)
        lengths = mask.sum(dim=1).to(logprobs.dtype)
        metrics = {"score": scores.mean(), "kl": kl.sum(dim=1).mean(), "kl_coef": torch.tensor(self.kl_ctl.value),
                   "reward": rewards.sum(dim=1).mean(),
                   "entropy": masked_mean(-logprobs, mask),  # E[-log pi(y_t)] under pi: the entropy, estimated
                   "explained_variance": explained_variance(values, returns, mask),
                   "value_mean": masked_mean(values, mask), "response_length": lengths.mean()}
        return rollout, {k: float(v) for k, v in metrics.items()}

    def optimise(self, rollout: Rollout, iteration: int) -> dict[str, float]:
        """``ppo_epochs`` passes over ``n_minibatches`` seeded minibatches; means of the losses' metrics."""
        args = self.args
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(rollout.encoded), generator=generator)
            for index in torch.tensor_split(order, args.n_minibatches):
                encoded, rows = rollout.rows(index)
                batch = pack(encoded, n=1, pad_id=self.tokenizer.pad_token_id).to(self.device)
                logps, values = self.forward_policy(batch)
                out = self.loss_fn(to_rows(logps, batch, rows["mask"]), mask=rows["mask"],
                                   old_logps=rows["logprobs"], advantages=rows["advantages"],
                                   values=to_rows(values, batch, rows["mask"]), old_values=rows["values"],
                                   returns=rows["returns"], clip_range=args.clip_range,
                                   clip_range_value=args.clip_range_value, vf_coef=args.vf_coef)
                if not torch.isfinite(out.loss):
                    raise PPOInstabilityError(
                        f"PPO stopped at iteration {iteration}: the loss is {float(out.loss)} "
                        f"(policy {float(out.metrics['loss/policy'])}, value {float(out.metrics['loss/value'])}); "
                        f"lower train.lr or loss.clip_range, or check the rewards")
                optimizer.zero_grad()
                self.manual_backward(out.loss)
                if self.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                for name, value in out.metrics.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
                updates += 1
        return {name.replace("loss/", "loss_"): total / updates for name, total in totals.items()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        iteration = int(batch["iteration"])
        rollout, metrics = self.rollout(iteration, batch["prompt_index"].tolist())
        self.check_kl(metrics["kl"], iteration)
        metrics.update(self.optimise(rollout, iteration))
        self.kl_ctl.update(metrics["kl"], len(rollout.encoded))
        metrics["iteration"] = float(iteration)
        self.history.append(metrics)
        self.log_dict({f"ppo/{k}": v for k, v in metrics.items() if k != "iteration"}, on_step=True,
                      on_epoch=False, batch_size=len(rollout.encoded), prog_bar=False)
        log.info("ppo %d: score %.3f kl %.3f kl_coef %.4f clipfrac %.3f", iteration, metrics["score"],
                 metrics["kl"], metrics["kl_coef"], metrics["clipfrac"])
        self.iteration = iteration + 1
        every = self.args.checkpoint_every
        if self.checkpoint_path is not None and (
                self.iteration == self.args.steps or (every and self.iteration % every == 0)):
            self.save_checkpoint(self.checkpoint_path)

    def check_kl(self, kl: float, iteration: int) -> None:
        """Stop on a NaN/infinite KL or one past ``max_kl`` (the safety net)."""
        if not math.isfinite(kl) or kl > self.args.max_kl:
            raise PPOInstabilityError(
                f"PPO stopped at iteration {iteration}: the KL to the reference is {kl:.4g} nats per response, "
                f"{'not finite' if not math.isfinite(kl) else f'past loss.max_kl={self.args.max_kl}'}; the policy "
                f"has drifted (raise loss.kl_coef, lower train.lr, or raise loss.max_kl if this is intended)")

    # -- optimisation and checkpoints -----------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        modules = [self.policy, self.value_head] + ([self.critic] if self.critic is not None else [])
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.optim.lr,
                                      weight_decay=self.optim.weight_decay, betas=tuple(self.optim.betas))
        warmup = max(1, self.optim.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return [optimizer], [scheduler]

    def save_checkpoint(self, path: Path) -> None:
        """Everything a resumed run needs to continue exactly (written atomically)."""
        state = {
            "iteration": self.iteration,
            "policy": self.policy.state_dict(),
            "value_head": self.value_head.state_dict(),
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "optimizer": self.optimizers().optimizer.state_dict(),
            "scheduler": self.lr_schedulers().state_dict(),
            "kl_controller": self.kl_ctl.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "history": self.history,
            "args": dataclasses.asdict(self.args),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        log.info("ppo checkpoint (iteration %d): %s", self.iteration, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, KL controller, iteration and history now; optimizer, scheduler and RNG
        states when training starts (the optimizer exists only then)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.policy.load_state_dict(state["policy"])
        self.value_head.load_state_dict(state["value_head"])
        if (state["critic"] is None) != (self.critic is None):
            raise ValueError(f"loss.resume_from={path}: the checkpoint's value model differs from "
                             f"loss.value_model={self.args.value_model}")
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.iteration, self.history = int(state["iteration"]), list(state["history"])
        self._pending = state

    def on_train_start(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        self.optimizers().optimizer.load_state_dict(state["optimizer"])
        self.lr_schedulers().load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _response_mask(batch: PackedBatch) -> Tensor:
    """(B, T) bool: True on the first ``lengths[b, 0]`` positions of row b (one response per prompt)."""
    lengths = batch.lengths[:, 0]
    return torch.arange(int(lengths.max()), device=lengths.device)[None, :] < lengths[:, None]


def build_scorer(args: PPOArgs, task: Any, max_prompt_len: int = 512) -> Scorer:
    """The reward r(x, y): the task's gold reward or the reward model at ``args.reward_model_path``."""
    if args.reward_source == "gold":
        return GoldScorer(task)
    return RewardModelScorer(str(args.reward_model_path), args.offload_reward_model, args.rollout_batch_size,
                             max_prompt_len)


def train_ppo(policy: nn.Module, reference: nn.Module | None, tokenizer, task: Any, args: PPOArgs,
              out_dir: str | Path, trainer_kwargs: dict[str, Any], *, optim: OptimArgs | None = None,
              max_grad_norm: float | None = 1.0, seed: int = 0, max_prompt_len: int = 512) -> list[dict[str, float]]:
    """Train ``policy`` in place with PPO on the task's training prompts; returns the per-iteration metrics.

    ``trainer_kwargs``: keyword arguments for ``lightning.Trainer`` (the hardware option's, and
    ``logger``). The checkpoint is ``out_dir/checkpoints/ppo-last.pt``; ``args.resume_from`` continues
    from one (same data, same seeds: the same subsequent metrics as an uninterrupted run).
    """
    scorer = build_scorer(args, task, max_prompt_len)
    prompts = task.prompts("train") if hasattr(task, "prompts") else [ex.prompt for ex in
                                                                        task.preference_examples("train")]
    if len(prompts) < args.rollout_batch_size:
        raise ValueError(f"loss.rollout_batch_size={args.rollout_batch_size} is more than the task's "
                         f"{len(prompts)} training prompts")
    module = PPOModule(policy, reference if args.reference == "frozen" else None, tokenizer, prompts, scorer,
                       args, optim, max_grad_norm, seed, max_prompt_len)
    module.checkpoint_path = Path(out_dir) / "checkpoints" / "ppo-last.pt"
    if args.resume_from:
        module.load_checkpoint(args.resume_from)
        log.info("ppo: resumed from %s at iteration %d", args.resume_from, module.iteration)
    schedule = PromptSchedule(len(prompts), args.rollout_batch_size, module.iteration, args.steps, seed)
    if len(schedule) == 0:
        log.info("ppo: nothing to do (iteration %d of %d)", module.iteration, args.steps)
        return module.history
    settings = {"max_epochs": 1, "enable_checkpointing": False, "enable_model_summary": False,
                "num_sanity_val_steps": 0, "log_every_n_steps": 1, "logger": False,
                "use_distributed_sampler": False, "default_root_dir": str(out_dir), **trainer_kwargs}
    trainer = L.Trainer(**settings)
    device = trainer.strategy.root_device
    module.scorer = scorer.to(device)
    trainer.fit(module, train_dataloaders=DataLoader(schedule, batch_size=None, shuffle=False))
    return module.history
