"""The length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval: A
Simple Way to Debias Automatic Evaluators", sec. 3): a logistic model of the judge's preference with a
length term, whose prediction with the length difference set to zero is the win rate the judge would
give if both responses had the same length.

For prompt i with verdict w_i in [0, 1] (1: the first response wins; the both-orders average, ties
half) and length difference d_i = len(first_i) - len(second_i) in characters:

    logit P(first wins | i) = theta_q + theta_len * tanh(d_i / s_d),     s_d = std(d) (sample, n - 1),

fitted by minimising the log loss on the soft labels w_i plus ||theta||^2 / (2 C), C = 100; then

    LC = sigmoid(theta_q)     (the prediction at d_i = 0, the same for every prompt).

Kept from AlpacaEval's ``length_controlled_v1`` GLM: the length term tanh(normalised length difference)
and the model's quality term, fitted on soft labels without a separate intercept. Left out: the
instruction-difficulty term (a per-instruction coefficient estimated there from many models' verdicts on
AlpacaEval's fixed instructions; one policy against one baseline cannot identify it) and the
regularisation towards AlpacaEval's gamed verbose/concise baselines (their annotations are AlpacaEval's
data). AlpacaEval fits with an L1 penalty chosen by 5-fold cross-validation; here the penalty is a fixed
L2 one at C = 100 (AlpacaEval's value without cross-validation), which only matters where the verdicts
are perfectly separated by length, keeping the fit finite. The interval: the sandwich (robust) variance
of theta_q, which soft labels need, mapped through the sigmoid (95%: sigmoid(theta_q +- 1.96 se)); the
stderr on the win-rate scale is LC (1 - LC) se (delta method).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

C = 100.0
"""Inverse strength of the L2 penalty (scikit-learn's convention: loss + ||theta||^2 / (2 C))."""
Z_95 = 1.959963984540054


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _solve(h: list[list[float]], g: list[float]) -> list[float]:
    """H^-1 g for a 2x2 symmetric positive-definite H."""
    det = h[0][0] * h[1][1] - h[0][1] * h[1][0]
    return [(h[1][1] * g[0] - h[0][1] * g[1]) / det, (h[0][0] * g[1] - h[1][0] * g[0]) / det]


def length_features(first_lengths: Sequence[float], second_lengths: Sequence[float]) -> list[float]:
    """tanh(d_i / s_d) for d_i = first_i - second_i; all 0 where the differences do not vary (s_d = 0)."""
    d = [float(a) - float(b) for a, b in zip(first_lengths, second_lengths)]
    if len(d) < 2:
        return [0.0] * len(d)
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return [math.tanh(x / sd) if sd > 0 else 0.0 for x in d]


def fit(wins: Sequence[float], features: Sequence[float], c: float = C, max_iter: int = 100,
        tol: float = 1e-10) -> tuple[float, float, list[list[float]]]:
    """(theta_q, theta_len, sandwich covariance) of the penalised logistic model (Newton's method)."""
    theta = [0.0, 0.0]
    xs = [(1.0, f) for f in features]
    hessian = [[1.0, 0.0], [0.0, 1.0]]
    for _ in range(max_iter + 1):
        grad = [theta[0] / c, theta[1] / c]
        hessian = [[1.0 / c, 0.0], [0.0, 1.0 / c]]
        for (x0, x1), w in zip(xs, wins):
            p = _sigmoid(theta[0] * x0 + theta[1] * x1)
            r, v = p - w, p * (1.0 - p)
            grad[0] += r * x0
            grad[1] += r * x1
            hessian[0][0] += v * x0 * x0
            hessian[0][1] += v * x0 * x1
            hessian[1][1] += v * x1 * x1
        hessian[1][0] = hessian[0][1]
        step = _solve(hessian, grad)
        theta = [theta[0] - step[0], theta[1] - step[1]]
        if max(abs(s) for s in step) < tol:
            break
    meat = [[0.0, 0.0], [0.0, 0.0]]
    for (x0, x1), w in zip(xs, wins):
        r = _sigmoid(theta[0] * x0 + theta[1] * x1) - w
        g = (r * x0, r * x1)
        for a in range(2):
            for b in range(2):
                meat[a][b] += g[a] * g[b]
    inverse_columns = [_solve(hessian, [1.0, 0.0]), _solve(hessian, [0.0, 1.0])]
    inverse = [[inverse_columns[0][0], inverse_columns[1][0]], [inverse_columns[0][1], inverse_columns[1][1]]]
    cov = [[sum(inverse[a][k] * meat[k][m] * inverse[m][b] for k in range(2) for m in range(2)) for b in range(2)]
           for a in range(2)]
    return theta[0], theta[1], cov


def length_controlled_win_rate(wins: Sequence[float], first_lengths: Sequence[float],
                               second_lengths: Sequence[float], prefix: str = "win_rate") -> dict[str, float]:
    """``{prefix}_lc`` with ``_lc_stderr``, ``_lc_ci_low``/``_lc_ci_high`` (95%) and the fitted
    ``_lc_length_coef`` (theta_len; its sign: longer first responses win more) for per-prompt verdicts
    ``wins`` and the two responses' lengths (see the module docstring). Empty for no prompts."""
    if not len(wins) == len(first_lengths) == len(second_lengths):
        raise ValueError(f"{len(wins)} verdicts, {len(first_lengths)} and {len(second_lengths)} lengths")
    if not wins:
        return {}
    for w in wins:
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"a verdict must lie in [0, 1], got {w}")
    theta_q, theta_len, cov = fit(wins, length_features(first_lengths, second_lengths))
    lc, se = _sigmoid(theta_q), math.sqrt(max(cov[0][0], 0.0))
    return {f"{prefix}_lc": lc, f"{prefix}_lc_stderr": lc * (1.0 - lc) * se,
            f"{prefix}_lc_ci_low": _sigmoid(theta_q - Z_95 * se), f"{prefix}_lc_ci_high": _sigmoid(theta_q + Z_95 * se),
            f"{prefix}_lc_length_coef": theta_len}
