"""Win rates under a judge, each pair judged in both orders.

A judge's ``compare(prompts, first, second)`` returns, per prompt, 1 when ``first`` wins, 0 when
``second`` wins and 0.5 for a tie. LLM judges favour a position (Zheng et al. 2023, "Judging
LLM-as-a-judge", sec. 3.3), so every pair is judged twice, with the two responses swapped, and the
two verdicts averaged (their sec. 3.4 "swap positions"):

    w_i = ( c(x_i, a_i, b_i) + 1 - c(x_i, b_i, a_i) ) / 2,   win rate = mean_i w_i,

ties counting as half a win. The standard error is that of the mean of the w_i. Two diagnostics
come with it: ``first_position_rate`` = mean_i (c(x_i, a_i, b_i) + c(x_i, b_i, a_i)) / 2, how
often the response shown first wins (0.5 for a judge without position bias), and ``consistency``,
the fraction of pairs whose verdict survives the swap (c(a, b) = 1 - c(b, a)). Given the responses'
lengths, the length-controlled win rate comes beside it (:mod:`alignexp.metrics.length_control`).
"""

from __future__ import annotations

from collections.abc import Sequence

from alignexp.distributed import on_main
from alignexp.judges.base import Judge
from alignexp.metrics.length_control import length_controlled_win_rate
from alignexp.metrics.overlap import plain_text
from alignexp.metrics.stats import summary
from alignexp.tasks.base import Text


def batched(fn, *columns: Sequence, batch_size: int = 64, desc: str | None = None,
            progress: bool = False) -> list[float]:
    """``fn(*column_slices)`` over consecutive slices of ``batch_size`` rows, concatenated (tqdm bar optional).
    On N ranks (every rank calls it) rank 0 alone calls ``fn`` and broadcasts the values: a judge's
    requests and counters are not repeated per rank."""
    return on_main(lambda: _batched(fn, *columns, batch_size=batch_size, desc=desc, progress=progress))


def _batched(fn, *columns: Sequence, batch_size: int, desc: str | None, progress: bool) -> list[float]:
    n = len(columns[0])
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None)
    out: list[float] = []
    for start in starts:
        part = fn(*(column[start:start + batch_size] for column in columns))
        if len(part) != min(batch_size, n - start):
            raise ValueError(f"{desc or fn}: returned {len(part)} values for {min(batch_size, n - start)} inputs")
        out.extend(float(v) for v in part)
    return out


def both_orders_verdicts(judge: Judge, prompts: Sequence[Text], first: Sequence[Text], second: Sequence[Text],
                         batch_size: int = 64, progress: bool = False) -> tuple[list[float], list[float]]:
    """The judge's verdicts on (first, second) and on the swapped pairs (second, first), per prompt."""
    if not len(prompts) == len(first) == len(second):
        raise ValueError(f"{len(prompts)} prompts, {len(first)} and {len(second)} responses")
    forward = batched(judge.compare, prompts, first, second, batch_size=batch_size,
                      desc=f"judging ({judge.name})", progress=progress)
    swapped = batched(judge.compare, prompts, second, first, batch_size=batch_size,
                      desc=f"judging swapped ({judge.name})", progress=progress)
    return forward, swapped


def char_lengths(texts: Sequence[Text]) -> list[int]:
    """Each response's length in characters (a message list: its assistant turns), as AlpacaEval counts."""
    return [len(plain_text(t)) for t in texts]


def both_orders_wins(forward: Sequence[float], swapped: Sequence[float]) -> list[float]:
    """w_i = (c(x_i, a_i, b_i) + 1 - c(x_i, b_i, a_i)) / 2 per prompt."""
    return [(f + 1.0 - s) / 2.0 for f, s in zip(forward, swapped)]


def win_rate_from_verdicts(forward: Sequence[float], swapped: Sequence[float], prefix: str = "win_rate",
                           first_lengths: Sequence[float] | None = None,
                           second_lengths: Sequence[float] | None = None) -> dict[str, float]:
    """The both-orders win rate of ``first`` and its diagnostics (see the module docstring); with the
    responses' lengths, the length-controlled win rate ``{prefix}_lc`` and its interval."""
    wins = both_orders_wins(forward, swapped)
    first_position = [(f + s) / 2.0 for f, s in zip(forward, swapped)]
    consistent = [float(abs(f - (1.0 - s)) < 1e-9) for f, s in zip(forward, swapped)]
    out = summary(prefix, wins)
    out[f"{prefix}_first_position_rate"] = summary("x", first_position)["x"]
    out[f"{prefix}_consistency"] = summary("x", consistent)["x"]
    out[f"{prefix}_n"] = len(wins)
    if first_lengths is not None and second_lengths is not None:
        out.update(length_controlled_win_rate(wins, first_lengths, second_lengths, prefix))
    return out


def win_rate(judge: Judge, prompts: Sequence[Text], first: Sequence[Text], second: Sequence[Text],
             prefix: str = "win_rate", batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """How often ``first`` beats ``second`` under ``judge``, both orders averaged, ties half, ± stderr, with
    the length-controlled win rate on the responses' lengths in characters."""
    forward, swapped = both_orders_verdicts(judge, prompts, first, second, batch_size, progress)
    return win_rate_from_verdicts(forward, swapped, prefix, char_lengths(first), char_lengths(second))
