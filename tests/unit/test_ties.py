"""Ties: one treatment (tied responses are never compared) across the listwise losses, the reward
model's loss, the pair builders and the evaluation's labelled pairs, checked by hand and on synthetic
rankings drawn at ``tau = 0``, where equal gold rewards are ties.

Useful values: log(1 + e^-1) = 0.313262, log(1 + e^-2) = 0.126928, log(1 + e^-1 + e^-2) = 0.407606,
log(4/3) = 0.287682.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from alignexp.losses import get_loss
from alignexp.losses.common import ordered_pairs
from alignexp.metrics.preference import labelled_pairs
from alignexp.sampling.pairing import make_pairs
from alignexp.tasks.base import RankedExample
from alignexp.tasks.synthetic import SyntheticTask

SP1, SP2 = math.log1p(math.exp(-1)), math.log1p(math.exp(-2))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-7, atol=1e-9)


def test_plackett_luce_with_a_tie_at_the_top():
    """Scores (1, 1, 0), u = (1, 0, -1): y0 and y1 are each compared with y2 only:
    log(1 + e^{-1 - 1}) + log(1 + e^{-1 - 0}) = 0.126928 + 0.313262 = 0.440190.
    The ordered list (no scores) gives log(1 + e^-1 + e^-2) + log(1 + e^-1) = 0.720868.
    ranked_dpo with beta = 1 and a zero reference has u = lp; the reward loss reads u as its rewards."""
    u, zeros = t([[1.0, 0.0, -1.0]]), torch.zeros(1, 3, dtype=torch.float64)
    tied = t([[1.0, 1.0, 0.0]])
    close(get_loss("ranked_dpo")(u, zeros, rewards=tied, beta=1.0).loss, SP2 + SP1)
    close(get_loss("reward")(u, rewards=tied).loss, SP2 + SP1)
    assert abs(SP2 + SP1 - 0.440190) < 1e-6
    ordered = math.log1p(math.exp(-1) + math.exp(-2)) + SP1
    assert abs(ordered - 0.720868) < 1e-6
    close(get_loss("ranked_dpo")(u, zeros, beta=1.0).loss, ordered)
    close(get_loss("reward")(u).loss, ordered)


def test_plackett_luce_with_a_tie_at_the_bottom_and_a_margin():
    """Scores (0.5, 0.2, 0.2), u = (1, 0, -1): only y0 has a worse response; y1 and y2 tie, no factor:
    log(1 + e^-1 + e^-2) = 0.407606. With the reward loss's margin m0 = 1 the factor becomes
    -log sigmoid(u0 - 1 - log(e^0 + e^-1)) = log(1 + e^{1 - 1}(1 + e^-1)) = log(2 + e^-1) = 0.861995."""
    u, zeros = t([[1.0, 0.0, -1.0]]), torch.zeros(1, 3, dtype=torch.float64)
    scores = t([[0.5, 0.2, 0.2]])
    close(get_loss("ranked_dpo")(u, zeros, rewards=scores, beta=1.0).loss, math.log1p(math.exp(-1) + math.exp(-2)))
    close(get_loss("reward")(u, rewards=scores, margin=1.0).loss, math.log(2 + math.exp(-1)))


def test_pro_and_rrhf_with_ties():
    """PRO, lengths 1, s = (0, 0, -ln 3 / 2), rewards (2, 2, 0), sft_weight 0: each of y0, y1 faces y2 alone,
    1/T = 2 - 0 = 2 and 1/T_self = 2: k = 0: log(e^0 + e^{2 (-ln 3/2)}) = log(1 + 1/3) = 0.287682; k = 1 the same.
    L = 2 log(4/3) = 0.575364. (The authors' code keeps y1 in y0's softmax at 1/T = 0: log(2 + 1/3) + log(4/3).)
    RRHF, lp = (-4, -4, -5), lengths (2, 4, 5), p = (-2, -1, -1), rewards (3, 3, 1): pairs (2 < 0): 1,
    (2 < 1): 0, and no (0, 1) pair; rank = 1, y_best = column 0, sft 4: L = 5."""
    lp = t([[0.0, 0.0, -math.log(3) / 2]])
    out = get_loss("pro")(lp, lengths=torch.ones(1, 3, dtype=torch.long), rewards=t([[2.0, 2.0, 0.0]]), sft_weight=0.0)
    close(out.loss, 2 * math.log(4 / 3))
    rrhf = get_loss("rrhf")(t([[-4.0, -4.0, -5.0]]), lengths=torch.tensor([[2, 4, 5]]), rewards=t([[3.0, 3.0, 1.0]]))
    close(rrhf.loss, 5.0)
    close(rrhf.metrics["loss/rank"], 1.0)


@pytest.mark.parametrize("name", ["ranked_dpo", "reward", "lipo", "rrhf", "pro"])
def test_a_list_of_tied_responses_is_left_out_of_the_mean(name):
    """Row 1's scores all tie: it has nothing to compare, so the batch loss is row 0's alone."""
    gen = torch.Generator().manual_seed(0)
    lp, lr = -torch.rand(2, 3, generator=gen, dtype=torch.float64) * 9 - 1, -torch.rand(2, 3, generator=gen, dtype=torch.float64) * 9
    lengths = torch.randint(1, 6, (2, 3), generator=gen)
    rewards = t([[0.9, 0.5, 0.1], [0.3, 0.3, 0.3]])
    both = get_loss(name)(lp, lr, lengths, rewards)
    alone = get_loss(name)(lp[:1], lr[:1], lengths[:1], rewards[:1])
    torch.testing.assert_close(both.loss, alone.loss)
    for key, value in alone.metrics.items():
        torch.testing.assert_close(both.metrics[key], value)


# --------------------------------------------------------------------------- tau = 0 synthetic rankings


def tau0_rankings(count: int = 300, n: int = 4) -> list[RankedExample]:
    """Synthetic rankings at tau = 0 (exact order by the gold reward, equal rewards tied), with the
    chain's own demonstrations as the sampled responses (no model needed); about 21% hold a tie."""
    task = SyntheticTask(tau=0.0, n_train_prompts=count)
    demonstrations = [ex.responses[0] for ex in task.sft_examples()]
    rng = random.Random(0)
    return task.preference_examples(sample_fn=lambda prompts, k: [rng.sample(demonstrations, k) for _ in prompts],
                                    n_responses=n)


@pytest.fixture(scope="module")
def rankings() -> list[RankedExample]:
    examples = tau0_rankings()
    tied = sum(len(set(ex.scores)) < ex.n for ex in examples)
    assert tied > 30, f"only {tied} of {len(examples)} rankings hold a tie: the test would not test ties"
    return examples


def test_pair_builders_losses_and_evaluation_compare_the_same_pairs(rankings):
    """For every tau = 0 ranking: the pairs ``make_pairs(..., "all")`` builds, the ordered pairs the
    listwise losses compare, and the labelled pairs evaluation scores are one and the same set."""
    scores = t([ex.scores for ex in rankings])
    better = ordered_pairs(torch.ones_like(scores, dtype=torch.bool), scores)
    for b, example in enumerate(rankings):
        losses = {(i, j) for i, j in itertools.product(range(example.n), repeat=2) if better[b, i, j]}
        builders = {pair.meta["pair"] if example.scores[pair.meta["pair"][0]] > example.scores[pair.meta["pair"][1]]
                    else pair.meta["pair"][::-1] for pair in make_pairs(example, "all")}
        evaluation = set(labelled_pairs(example.n, example.scores))
        assert losses == builders == evaluation, (b, example.scores)


def permute_within_ties(scores: list[float], rng: random.Random) -> list[int]:
    """A column order that shuffles responses among those with equal scores (best first kept)."""
    order = list(range(len(scores)))
    for _, group in itertools.groupby(order, key=lambda i: scores[i]):
        group = list(group)
        shuffled = group[:]
        rng.shuffle(shuffled)
        for slot, column in zip(group, shuffled):
            order[slot] = column
    return order


@pytest.mark.parametrize("name,key", [("ranked_dpo", None), ("reward", None), ("lipo", None),
                                      ("rrhf", "loss/rank"), ("pro", "loss/rank")])
def test_no_loss_imposes_an_order_on_tied_responses(rankings, name, key):
    """Swapping tied responses (with their log-probs) leaves every listwise loss unchanged: none of them
    reads the order the task happened to give ties. (RRHF's and PRO's SFT terms are on the first of the
    tied best by definition, so their ranking terms are compared.) The ordered treatment -- no scores,
    so the columns' order is the ranking -- does change under the same swaps."""
    scores = t([ex.scores for ex in rankings])
    gen = torch.Generator().manual_seed(1)
    lp = -torch.rand(scores.shape, generator=gen, dtype=torch.float64) * 20 - 1
    lr = -torch.rand(scores.shape, generator=gen, dtype=torch.float64) * 20 - 1
    lengths = torch.randint(1, 8, scores.shape, generator=gen)
    rng = random.Random(2)
    order = torch.tensor([permute_within_ties(ex.scores, rng) for ex in rankings])
    assert (order != torch.arange(scores.shape[1])).any()
    swap = lambda x: x.gather(1, order)  # noqa: E731
    fn = get_loss(name)
    value = lambda out: out.loss if key is None else out.metrics[key]  # noqa: E731
    torch.testing.assert_close(value(fn(lp, lr, lengths, scores)), value(fn(swap(lp), swap(lr), swap(lengths), swap(scores))))
    ordered, swapped = value(fn(lp, lr, lengths)), value(fn(swap(lp), swap(lr), swap(lengths)))
    assert not torch.allclose(ordered, swapped)
