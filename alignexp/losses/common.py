"""Tensor helpers shared by the losses: masking, ties, batch means, implicit-reward metrics.

Conventions (see :mod:`alignexp.losses.registry`): tensors are (B, n), column 0 the best response,
``mask`` True where a response exists. Masked slots may hold anything (0, garbage, NaN rewards);
the losses replace them with neutral values (:func:`clean`, :func:`clean_lengths`) *before* any
arithmetic, so that neither the loss nor its gradient ever sees them (``0 * nan`` is ``nan`` in a
backward pass, so zeroing a term after computing it is not enough). Ties: :func:`ordered_pairs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clean(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """``values`` with masked slots replaced by ``fill`` (NaN and garbage never reach the maths)."""
    return torch.where(mask, values, torch.full_like(values, fill))


def clean_lengths(lengths: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Response lengths as ``dtype``, masked slots (length 0) set to 1 so that dividing by them is safe."""
    lengths = lengths.to(dtype)
    return torch.where(mask, lengths.clamp(min=1), torch.ones_like(lengths))


def pair_mask(mask: Tensor) -> Tensor:
    """(B,) True where the first two slots both exist, i.e. the row holds a (chosen, rejected) pair."""
    if mask.shape[1] < 2:
        return torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    return mask[:, 0] & mask[:, 1]


def batch_mean(per_example: Tensor, rows: Tensor) -> Tensor:
    """Mean of ``per_example`` (B,) over the rows where ``rows`` is True.

    Rows without a pair or a list to rank are left out of the mean rather than counted as zero; when
    no row counts, the result is a 0 that keeps the graph (so ``backward`` still works).
    """
    values = torch.where(rows, per_example, torch.zeros_like(per_example))
    return values.sum() / rows.sum().clamp(min=1).to(values.dtype)


def later_mask(mask: Tensor) -> Tensor:
    """(B, n, n) bool, ``[b, k, j]`` True where slots k and j both exist and j comes after k (j > k)."""
    n = mask.shape[1]
    after = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(diagonal=1)
    return after[None] & mask[:, :, None] & mask[:, None, :]


def ordered_pairs(mask: Tensor, rewards: Tensor | None = None) -> Tensor:
    """(B, n, n) bool, ``[b, i, j]`` True where responses i and j both exist and i is strictly better
    than j: ``rewards[b, i] > rewards[b, j]`` when scores are given, else i comes before j in the ranking.

    This is the one treatment of ties every listwise loss, the reward model and the pair builders
    share: **tied responses are never compared** (equal scores make no pair, and no Plackett-Luce
    factor puts one tied response against another; see :func:`plackett_luce_nll`). It is the
    pairwise convention of RRHF (Yuan et al. 2023, Eq. 2: pairs with r_i < r_j), of LiPO-lambda's
    LambdaLoss (Liu et al. 2024, Eq. 8: pairs with psi_i > psi_j) and of DPO's pairs (a tie carries no
    preference). A ranking without scores has no ties. Scores that are NaN in an existing slot compare
    False both ways, so they make no pair either.
    """
    if rewards is None:
        return later_mask(mask)
    rewards = clean(rewards, mask)
    return mask[:, :, None] & mask[:, None, :] & (rewards[:, :, None] > rewards[:, None, :])


def comparable_rows(better: Tensor) -> Tensor:
    """(B,) True where the row holds at least one ordered pair (``better`` from :func:`ordered_pairs`):
    the rows a listwise loss averages over (a list of one response, or of tied responses only, teaches nothing)."""
    return better.any(dim=2).any(dim=1)


def plackett_luce_nll(u: Tensor, better: Tensor, margin: float = 0.0) -> Tensor:
    """Per-row negative log-likelihood (B,) of a ranking under Plackett-Luce with utilities ``u`` (B, n),
    ties left uncompared:

        L = -sum_k log( e^{u_k - m0} / (e^{u_k - m0} + sum_{j: y_k > y_j} e^{u_j}) )
          =  sum_k -log sigmoid(u_k - m0 - logsumexp_{j: y_k > y_j} u_j)

    over the responses k that are strictly better than at least one response (``better[b, k, j]``,
    :func:`ordered_pairs`); m0 = ``margin`` (0 for a plain Plackett-Luce likelihood).

    Without ties this is the Plackett-Luce likelihood of the ranking (DPO paper, Rafailov et al. 2023,
    Appendix A.3, Eq. 18): the k-th factor is the probability that y_k is chosen first among y_k and
    every response ranked below it; with n = 2 it is Bradley-Terry, -log sigmoid(u_0 - u_1). With ties
    each tied response is compared, as above, with the responses strictly worse than it only, never
    with the responses it ties with; a tie at the bottom of a list gives no factor and a list of tied
    responses none at all (the "tied factors dropped" treatment). Example: scores (1, 1, 0) and
    u = (1, 0, -1) give log(1 + e^-2) + log(1 + e^-1) = 0.126928 + 0.313262 = 0.440190, where the
    ordered list would give log(1 + e^-1 + e^-2) + log(1 + e^-1) = 0.720868.

    The log-sigmoid form is the same number as the softmax form, is stable for any u, and makes the
    n = 2 case literally DPO's -log sigmoid(u_0 - u_1).
    """
    rest = torch.logsumexp(u[:, None, :].masked_fill(~better, torch.finfo(u.dtype).min), dim=2)
    has_worse = better.any(dim=2)
    terms = -F.logsigmoid(u - margin - rest)
    return torch.where(has_worse, terms, torch.zeros_like(terms)).sum(dim=1)


def ranking_nll(u: Tensor, mask: Tensor, rewards: Tensor | None, margin: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """The Plackett-Luce negative log-likelihood of each row's ranking (:func:`plackett_luce_nll`) with
    ties from ``rewards`` (:func:`ordered_pairs`). Returns (per-row loss (B,), ``better`` (B, n, n), the
    rows that hold an ordered pair (B,))."""
    better = ordered_pairs(mask, rewards)
    return plackett_luce_nll(u, better, margin), better, comparable_rows(better)


def position_labels(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Ranking positions as labels when no scores are given: the number of existing responses after
    each slot, i.e. ``m - 1 - k`` for a list of m responses (best gets m - 1, worst 0). (B, n) ``dtype``."""
    return later_mask(mask).sum(dim=2).to(dtype)


def pairwise_accuracy(scores: Tensor, better: Tensor, rows: Tensor) -> Tensor:
    """Share of the pairs (i better than j, ``better`` (B, n, n)) whose ``scores`` are ordered the same
    way (strictly), averaged within each row and then over the rows that have a pair."""
    scores = scores.detach()
    correct = (scores[:, :, None] > scores[:, None, :]) & better
    n_pairs = better.sum(dim=(1, 2))
    per_row = correct.sum(dim=(1, 2)).to(scores.dtype) / n_pairs.clamp(min=1).to(scores.dtype)
    return batch_mean(per_row, rows & (n_pairs > 0))


def pair_reward_metrics(chosen: Tensor, rejected: Tensor, rows: Tensor,
                        prefix: str = "rewards") -> dict[str, Tensor]:
    """Means over ``rows`` of ``chosen``, ``rejected`` (B,), their margin, and how often chosen > rejected."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        f"{prefix}/chosen": batch_mean(chosen, rows),
        f"{prefix}/rejected": batch_mean(rejected, rows),
        f"{prefix}/margin": batch_mean(chosen - rejected, rows),
        f"{prefix}/accuracy": batch_mean((chosen > rejected).to(chosen.dtype), rows),
    }


def list_reward_metrics(values: Tensor, mask: Tensor, better: Tensor,
                        prefix: str = "rewards") -> dict[str, Tensor]:
    """Metrics of per-response ``values`` (B, n) (implicit rewards, or normalised log-probs) on lists.

    ``{prefix}/chosen``: the best response's value; ``{prefix}/rejected``: the mean over the other
    responses of the row; ``{prefix}/margin``: their difference; ``{prefix}/accuracy``: the share of
    ordered pairs (``better``) that ``values`` order correctly. With n = 2 these equal DPO's metrics.
    Rows without an ordered pair (a single response, or tied responses only) are left out.
    """
    values = clean(values.detach(), mask)
    rows = comparable_rows(better)
    others = mask.clone()
    others[:, 0] = False
    rejected = values.masked_fill(~others, 0).sum(dim=1) / others.sum(dim=1).clamp(min=1).to(values.dtype)
    chosen = values[:, 0]
    return {
        f"{prefix}/chosen": batch_mean(chosen, rows),
        f"{prefix}/rejected": batch_mean(rejected, rows),
        f"{prefix}/margin": batch_mean(chosen - rejected, rows),
        f"{prefix}/accuracy": pairwise_accuracy(values, better, rows),
    }


def pooled_nll(logps: Tensor, lengths: Tensor, rows: Tensor) -> Tensor:
    """The token-mean negative log-likelihood of responses pooled over the batch: the summed NLL of the rows
    where ``rows`` is True divided by their total token count (``logps``, ``lengths``: (B,)). This is the
    cross-entropy over the batch's response tokens, as TRL computes its NLL terms (CPO's, RPO's ``sft``),
    so a long response weighs by its tokens, not as one example."""
    logps = torch.where(rows, logps, torch.zeros_like(logps))
    tokens = torch.where(rows, lengths.to(logps.dtype), torch.zeros_like(logps)).sum().clamp(min=1)
    return -logps.sum() / tokens


def token_mean_logps(logps: Tensor, lengths: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probs (B, n) divided by their response lengths: the average log-prob per token (masked slots 0)."""
    return clean(logps, mask) / clean_lengths(lengths, mask, logps.dtype)
