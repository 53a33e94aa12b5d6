"""PPO for RLHF: a KL-penalised actor-critic on the policy's own samples, as a LightningModule (manual
optimisation; the maths is :mod:`alignexp.losses.ppo`). The rollouts sample at ``ppo.temperature`` T,
i.e. from pi_T = softmax(logits / T), so every log-prob here is of the tempered distribution: the
rollout's old log-probs, the update's (hence the ratio), and the reference's, so the KL penalty is
KL(pi_T || pi_ref,T), the tempered policy's to the tempered reference, as TRL's PPOTrainer computes it
(at T = 1, the usual KL(pi || pi_ref)). Dropout is off in the policy and the critic, so a rollout's
forward and an update's agree.

On N processes (DDP): each iteration's ``ppo.rollout_batch_size`` prompts are the global batch; each rank
samples, scores and runs the policy, value and reference forwards on its contiguous share of them
(:func:`shard`), and the per-token results are gathered to every rank (:meth:`PPOModule.gather_rollout`), so
the KL-penalised rewards, GAE, the whitening of the advantages and the KL controller's statistics are over
all the rollouts, the same on every rank. Each seeded minibatch of the update is the one-process minibatch,
split over the ranks; each rank's loss is scaled so that DDP's mean of the ranks' gradients is the gradient
of the whole minibatch's token mean. A run on N processes thus follows the one-process run (to rounding).
Precision: per-token log-probs, values, rewards, advantages and the loss are fp32 whatever the compute
dtype (bf16 under ``bf16-mixed``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from alignexp.args import OptimArgs, PPOArgs
from alignexp.distributed import all_gather, barrier, is_main, rank, world_size
from alignexp.errors import AlignexpError
from alignexp.files import atomic_write
from alignexp.judges.base import Judge
from alignexp.lightning_modules.optim import adamw_with_warmup
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
from alignexp.models.dropout import disable_dropout
from alignexp.models.logprobs import (
    EncodedExample,
    PackedBatch,
    encode_text,
    pack,
    response_states,
    token_logps,
)
from alignexp.models.reference import reference_token_logps
from alignexp.models.value_head import ValueHead
from alignexp.sampling.engine import SamplingParams, generate
from alignexp.sampling.text import decode, sample_seed
from alignexp.tasks.base import Text

log = logging.getLogger(__name__)


class PPOInstabilityError(AlignexpError, RuntimeError):
    """PPO diverged: a NaN or infinite loss, reward or KL, or a KL to the reference past ``ppo.max_kl``."""


def to_rows(flat: Tensor, batch: PackedBatch, mask: Tensor) -> Tensor:
    """Per-token values (N,) of a packed batch with one response per prompt -> (B, T) right-padded.

    Tokens are put in order by (response, position): ``slot``, then ``source_index`` (which grows
    along a response), so the result does not depend on the order the packer lists them in.
    """
    order = torch.argsort(batch.slot * batch.input_ids.numel() + batch.source_index)
    return torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device).masked_scatter(mask, flat[order])


def shard(items: Sequence, ranks: int, me: int) -> list:
    """Rank ``me``'s contiguous share of ``items`` split over ``ranks`` (sizes differ by one at most)."""
    bounds = [len(items) * r // ranks for r in range(ranks + 1)]
    return list(items[bounds[me]:bounds[me + 1]])


def pad_rows(rows: Sequence[Tensor], width: int, device) -> Tensor:
    """Variable-length 1-D rows -> (B, ``width``) right-padded with 0."""
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype, device=device)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row.to(device)
    return out


@dataclass
class Rollout:
    """One iteration's samples and their per-token quantities, (B, T) right-padded with ``mask``."""

    encoded: list[EncodedExample]
    mask: Tensor
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor

    def rows(self, index: Tensor) -> tuple[list[EncodedExample], dict[str, Tensor]]:
        """The examples ``index`` and their per-token tensors, cut to their longest response."""
        width = int(self.mask[index].sum(dim=1).max())
        tensors = {name: getattr(self, name)[index][:, :width]
                   for name in ("mask", "logprobs", "values", "advantages", "returns")}
        return [self.encoded[i] for i in index.tolist()], tensors


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
    """PPO on ``prompts``, one :class:`PromptSchedule` item per iteration, rewarded by ``judge.score``.

    An iteration: one sample per prompt (per-prompt seeds), scored; per-token log pi_old, values (the value
    head on the policy's last hidden states, or a separate critic's) and log pi_ref (``reference``: a frozen
    model, or the LoRA policy with its adapters off); rewards r_t = -beta (log pi_old - log pi_ref) +
    [t = T] r(x, y) (Ziegler et al. 2019), GAE, whitened advantages; ``ppo_epochs`` passes over
    ``n_minibatches`` seeded minibatches of the ``ppo`` loss; the KL controller's update. A non-finite
    reward, loss or KL, or a KL past ``max_kl``, raises :class:`PPOInstabilityError`. The checkpoint at
    ``checkpoint_path`` (every ``checkpoint_every`` iterations and at the end) resumes exactly.
    """

    def __init__(self, policy: nn.Module, reference: nn.Module, tokenizer, prompts: Sequence[Text], judge: Judge,
                 args: PPOArgs, *, loss_hparams: Mapping[str, Any] | None = None, optim: OptimArgs | None = None,
                 max_grad_norm: float | None = 1.0, seed: int = 0, max_prompt_len: int = 512,
                 checkpoint_path: Path | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.args, self.loss_hparams, self.optim = args, dict(loss_hparams or {}), optim or OptimArgs()
        self.policy = policy.train()
        disable_dropout(policy)
        self.reference = reference.requires_grad_(False).eval()
        self.critic = copy.deepcopy(policy) if args.value_model == "critic" else None
        self.value_head = ValueHead(policy.get_output_embeddings().in_features)
        self.tokenizer, self.prompts, self.judge = tokenizer, list(prompts), judge
        self.max_grad_norm, self.seed, self.max_prompt_len = max_grad_norm, seed, max_prompt_len
        self.checkpoint_path = checkpoint_path
        self.kl_ctl: FixedKLController = (AdaptiveKLController(args.kl_coef, args.target_kl, args.horizon)
                                          if args.adaptive_kl else FixedKLController(args.kl_coef))
        self.loss_fn = get_loss("ppo")
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, Any] | None = None  # optimiser/scheduler/RNG states to restore at train start

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()
        return self

    def prompt_loader(self) -> DataLoader:
        """The iterations still to run, ``self.iteration`` to ``steps``, one item each."""
        schedule = PromptSchedule(len(self.prompts), self.args.rollout_batch_size, self.iteration, self.args.steps,
                                  self.seed)
        return DataLoader(schedule, batch_size=None, shuffle=False)

    def forward_policy(self, batch: PackedBatch) -> tuple[Tensor, Tensor]:
        """Per-token log pi_T (N,) and values (N,): one policy forward (two with a separate critic)."""
        states = response_states(self.policy, batch)
        logps = token_logps(self.policy, batch, states, temperature=self.args.temperature)
        if self.critic is not None:
            states = response_states(self.critic, batch)
        values = self.value_head(states)  # bf16 under autocast: the values, returns and value loss are fp32 at least
        return logps, values.to(torch.promote_types(values.dtype, torch.float32))

    @torch.no_grad()
    def rollout(self, iteration: int, prompt_index: Sequence[int]) -> tuple[Rollout, dict[str, float]]:
        """Sample, score and compute rewards and advantages for the prompts ``prompt_index`` (all ranks'; this
        rank samples its :func:`shard` of them, and the results are gathered)."""
        args, tokenizer = self.args, self.tokenizer
        mine = shard(list(prompt_index), world_size(), rank())
        prompts = [self.prompts[i] for i in mine]
        prompt_ids = [encode_text(tokenizer, p, is_prompt=True)[-self.max_prompt_len:] for p in prompts]
        seeds = [sample_seed(self.seed * 1_000_003 + iteration, i, 0) for i in mine]
        params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
        generations = generate(self.policy, prompt_ids, params, eos_id=tokenizer.eos_token_id,
                               pad_id=tokenizer.pad_token_id, seeds=seeds, batch_size=args.rollout_batch_size)
        scores = torch.tensor(self.judge.score(prompts, [decode(tokenizer, g) for g in generations]),
                              dtype=torch.float32)
        encoded = [EncodedExample(p, [g.token_ids]) for p, g in zip(prompt_ids, generations)]
        batch = pack(encoded, n=1, pad_id=tokenizer.pad_token_id).to(self.device)
        lengths = batch.lengths[:, 0]  # (B, T) mask, right-padded: one response per prompt
        mask = torch.arange(int(lengths.max()), device=lengths.device)[None, :] < lengths[:, None]
        logps, values = self.forward_policy(batch)
        logprobs, values = to_rows(logps, batch, mask), to_rows(values, batch, mask)
        ref_logprobs = to_rows(reference_token_logps(self.reference, batch, args.temperature), batch, mask)
        encoded, scores, mask, logprobs, values, ref_logprobs = self.gather_rollout(
            encoded, scores, mask, logprobs, values, ref_logprobs)
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise PPOInstabilityError(f"PPO stopped at iteration {iteration}: the reward is not finite for {bad} of "
                                      f"{len(scores)} responses (ppo.judge={self.judge.name})")
        scores = scores.to(self.device, logprobs.dtype)
        rewards, kl = kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask)
        metrics = {"score": scores.mean(), "kl": kl.sum(dim=1).mean(), "kl_coef": torch.tensor(self.kl_ctl.value),
                   "reward": rewards.sum(dim=1).mean(),
                   "entropy": masked_mean(-logprobs, mask),  # E[-log pi_T(y_t)] under pi_T: its entropy, estimated
                   "explained_variance": explained_variance(values, returns, mask),
                   "value_mean": masked_mean(values, mask), "response_length": mask.sum(dim=1).float().mean()}
        rollout = Rollout(encoded, mask, logprobs, values, advantages, returns)
        return rollout, {k: float(v) for k, v in metrics.items()}

    def gather_rollout(self, encoded: list[EncodedExample], scores: Tensor, mask: Tensor,
                       *per_token: Tensor) -> tuple:
        """Every rank's examples, scores (B,) and per-token (B, T) tensors, in rank order (the order of the
        iteration's prompts), on every rank; each rank's own tensors unchanged with one process."""
        if world_size() == 1:
            return (encoded, scores, mask, *per_token)
        lengths = mask.sum(dim=1).tolist()
        mine = [(example, float(score), *(t[b, :n].cpu() for t in per_token))
                for b, (example, score, n) in enumerate(zip(encoded, scores.tolist(), lengths))]
        rows = [row for part in all_gather(mine) for row in part]
        width = max(len(row[2]) for row in rows)
        lengths = torch.tensor([len(row[2]) for row in rows], device=mask.device)
        mask = torch.arange(width, device=mask.device)[None, :] < lengths[:, None]
        gathered = [pad_rows([row[2 + k] for row in rows], width, mask.device) for k in range(len(per_token))]
        return ([row[0] for row in rows], torch.tensor([row[1] for row in rows], dtype=scores.dtype), mask,
                *gathered)

    def optimise(self, rollout: Rollout, iteration: int) -> dict[str, float]:
        """``ppo_epochs`` passes over ``n_minibatches`` seeded minibatches of the whole rollout; means of the
        loss's metrics. On N ranks each minibatch is split over them (:func:`shard`) and rank r's loss is
        ``N * loss_r * tokens_r / tokens``, so that the mean of the ranks' gradients (DDP's) is the gradient
        of the minibatch's token mean, and its metrics enter the minibatch's means weighted by ``tokens_r``."""
        args = self.args
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        ranks, me = world_size(), rank()
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(args.ppo_epochs):
            order = torch.randperm(len(rollout.encoded), generator=generator)
            for minibatch in torch.tensor_split(order, args.n_minibatches):
                index = torch.tensor(shard(minibatch.tolist(), ranks, me), dtype=torch.long)
                encoded, rows = rollout.rows(index)
                share = float(rows["mask"].sum()) / float(rollout.mask[minibatch].sum())  # tokens_r / tokens
                batch = pack(encoded, n=1, pad_id=self.tokenizer.pad_token_id).to(self.device)
                logps, values = self.forward_policy(batch)
                out = self.loss_fn(to_rows(logps, batch, rows["mask"]), mask=rows["mask"],
                                   old_logps=rows["logprobs"], advantages=rows["advantages"],
                                   values=to_rows(values, batch, rows["mask"]), old_values=rows["values"],
                                   returns=rows["returns"], **self.loss_hparams)
                self.check_loss(out, iteration)
                optimizer.zero_grad()
                self.manual_backward(out.loss * (ranks * share) if ranks > 1 else out.loss)
                if self.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                for name, value in out.metrics.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * (share if ranks > 1 else 1.0)
                updates += 1
        if ranks > 1:  # each minibatch's metrics: the ranks' shares summed, in rank order (the same on every rank)
            parts = all_gather(totals)
            totals = {name: sum(part[name] for part in parts) for name in totals}
        return {name.replace("loss/", "loss_"): total / updates for name, total in totals.items()}

    def check_loss(self, out, iteration: int) -> None:
        """Stop on a NaN or infinite loss, on every rank together when any rank's is."""
        loss = float(out.loss.detach())
        losses = all_gather(loss) if world_size() > 1 else [loss]
        bad = [(r, value) for r, value in enumerate(losses) if not math.isfinite(value)]
        if bad:
            where = f" on rank {bad[0][0]}" if len(losses) > 1 else ""
            raise PPOInstabilityError(
                f"PPO stopped at iteration {iteration}: the loss is {bad[0][1]}{where} "
                f"(policy {float(out.metrics['loss/policy'])}, value {float(out.metrics['loss/value'])}); "
                f"lower train.lr or loss.clip_range, or check the rewards")

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        iteration = int(batch["iteration"])
        rollout, metrics = self.rollout(iteration, batch["prompt_index"].tolist())
        self.check_kl(metrics["kl"], iteration)
        metrics.update(self.optimise(rollout, iteration))
        self.kl_ctl.update(metrics["kl"], len(rollout.encoded))
        self.history.append({**metrics, "iteration": float(iteration)})
        self.log_dict({f"ppo/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False,
                      batch_size=len(rollout.encoded))
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
                f"{'not finite' if not math.isfinite(kl) else f'past ppo.max_kl={self.args.max_kl}'}; the policy "
                f"has drifted (raise ppo.kl_coef, lower train.lr, or raise ppo.max_kl if this is intended)")

    def configure_optimizers(self):
        modules = [self.policy, self.value_head] + ([self.critic] if self.critic is not None else [])
        optimizer, scheduler = adamw_with_warmup((p for m in modules for p in m.parameters() if p.requires_grad),
                                                 self.optim)
        return [optimizer], [scheduler]

    def save_checkpoint(self, path: Path) -> None:
        """Everything a resumed run needs to continue exactly (written atomically, by rank 0: every rank holds
        the same weights, optimizer and controller states; the random streams that matter are seeded)."""
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
        if is_main():
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            log.info("ppo checkpoint (iteration %d): %s", self.iteration, path)
        barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, KL controller, iteration and history now; optimiser, scheduler and RNG
        states when training starts (the optimiser exists only then)."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        if (state["critic"] is None) != (self.critic is None):
            raise AlignexpError(f"ppo.resume_from={path}: the checkpoint's value model differs from "
                                f"ppo.value_model={self.args.value_model}")
        self.policy.load_state_dict(state["policy"])
        self.value_head.load_state_dict(state["value_head"])
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
