"""The synthetic task: a seeded toy language with a known gold reward (the offline default).

It stands in for the DPO paper's IMDb controlled-sentiment task, on CPU, in minutes.

* **Language.** Text is a first-order Markov chain over an alphabet of ``alphabet_size`` letters
  (``a``, ``b``, ...) whose transition rows are Dirichlet(``concentration``) draws fixed by the seed.
  A prompt is the first ``prompt_len`` letters of a text followed by ``:``; its demonstration (the
  SFT data) continues the chain from the prompt's last letter for ``min_len``..``max_len`` letters.
  Like a movie-review prefix and its continuation, the response depends on the prompt.
* **Gold reward.** Each letter has a fixed sentiment: the first quarter of the alphabet is positive
  (+1), the last quarter negative (-1), the rest neutral (0). ``r*(x, y)`` is the mean sentiment of
  the response's characters (anything outside the alphabet counts 0), in [-1, 1]. The SFT policy
  writes what the chain writes, leaving room to improve; the reward can be over-optimised: a run of
  one positive letter scores 1 but is text the chain almost never writes, so the reward/KL
  trade-off is visible.
* **Preferences.** n samples per prompt from the SFT policy, ranked by a Plackett-Luce draw on
  ``r*/tau`` (Gumbel-max: sort by ``r* + tau * G``; ``tau`` is label noise, 0 gives the exact
  order, equal rewards then being ties). Each example's ``scores`` are the annotator's perturbed
  utilities ``r* + tau * G`` (the exact rewards when tau = 0), so they agree with the ranking;
  the exact rewards are kept in ``meta["gold_rewards"]``. With ``binary_threshold`` set, each sample
  is judged alone instead (binary feedback for KTO): desirable where r*(x, y) >= the threshold.
* **Evaluation.** ``n_eval_prompts`` held-out prompts drawn from a separate stream.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable, Sequence

from alignexp.tasks.base import RankedExample, Task, Text, check_ranking_length

SEPARATOR = ":"
SPLITS = ("train", "eval", "validation")

SampleFn = Callable[[list[Text], int], list[list[str]]]
"""``sample_fn(prompts, n)``: n sampled responses (text) for each prompt."""


class SyntheticTask(Task):
    """See the module docstring. All randomness flows from ``seed``."""

    has_gold_reward = True
    trains_sft_policy = True
    offline_preferences = False
    samples_preferences = True

    def __init__(self, name: str = "synthetic", seed: int = 0, alphabet_size: int = 16, prompt_len: int = 8,
                 min_len: int = 8, max_len: int = 16, concentration: float = 0.3,
                 n_sft: int = 4096, n_train_prompts: int = 512, n_eval_prompts: int = 128,
                 n_val_prompts: int = 128, n_responses: int = 4, tau: float = 0.05,
                 ranking_length: int | None = None, skip_invalid: bool = False, eval_split: str = "eval",
                 binary_threshold: float | None = None):
        if not 2 <= alphabet_size <= 26:
            raise ValueError(f"task.alphabet_size must be in [2, 26], got {alphabet_size}")
        if prompt_len < 1:
            raise ValueError(f"task.prompt_len must be >= 1, got {prompt_len}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"task.min_len/max_len must satisfy 1 <= min_len <= max_len, got {min_len}, {max_len}")
        if tau < 0:
            raise ValueError(f"task.tau must be >= 0, got {tau}")
        if n_responses < 1:
            raise ValueError(f"task.n_responses must be >= 1, got {n_responses}")
        check_ranking_length(ranking_length)
        if eval_split not in SPLITS[1:]:
            raise ValueError(f"task.eval_split must be eval or validation, got {eval_split!r}")
        self.name, self.ranking_length, self.eval_split = name, ranking_length, eval_split
        self.n_val_prompts = n_val_prompts
        self.concentration = concentration
        self.seed, self.alphabet = seed, string.ascii_lowercase[:alphabet_size]
        self.prompt_len, self.min_len, self.max_len = prompt_len, min_len, max_len
        self.n_sft, self.n_train_prompts, self.n_eval_prompts = n_sft, n_train_prompts, n_eval_prompts
        self.n_responses, self.tau = n_responses, tau
        if binary_threshold is not None and (isinstance(binary_threshold, bool)
                                             or not isinstance(binary_threshold, (int, float))):
            raise ValueError(f"task.binary_threshold must be a number or null, got {binary_threshold!r}")
        self.binary_threshold = binary_threshold
        rng = random.Random(f"{seed}/chain")
        self.initial = _dirichlet(rng, alphabet_size, concentration)
        self.transitions = [_dirichlet(rng, alphabet_size, concentration) for _ in range(alphabet_size)]
        quarter = max(1, alphabet_size // 4)
        self.sentiment = {ch: 1.0 if i < quarter else -1.0 if i >= alphabet_size - quarter else 0.0
                          for i, ch in enumerate(self.alphabet)}

    # -- the language ---------------------------------------------------------------------------
    def _chain(self, rng: random.Random, length: int, after: str | None = None) -> str:
        chars: list[str] = []
        previous = after
        while len(chars) < length:
            row = self.initial if previous is None else self.transitions[self.alphabet.index(previous)]
            previous = rng.choices(self.alphabet, row)[0]
            chars.append(previous)
        return "".join(chars)

    def _prompt(self, rng: random.Random) -> str:
        return self._chain(rng, self.prompt_len) + SEPARATOR

    def _demonstration(self, rng: random.Random, prompt: str) -> str:
        return self._chain(rng, rng.randint(self.min_len, self.max_len), after=prompt.rstrip(SEPARATOR)[-1])

    def prompts(self, split: str = "train") -> list[str]:
        """The prompts of ``split``: ``train`` (preference prompts), ``eval`` (held out, for the results) or
        ``validation`` (held out too, for choosing hyper-parameters); each its own random stream."""
        if split not in SPLITS:
            raise ValueError(f"the synthetic task's splits are {', '.join(SPLITS)}, got {split!r}")
        count = {"train": self.n_train_prompts, "eval": self.n_eval_prompts, "validation": self.n_val_prompts}[split]
        rng = random.Random(f"{self.seed}/prompts/{split}")
        return [self._prompt(rng) for _ in range(count)]

    def sft_key(self) -> dict[str, object]:
        """What the demonstrations depend on: the language and how many there are."""
        return {"task": self.name, "seed": self.seed, "alphabet_size": len(self.alphabet),
                "prompt_len": self.prompt_len, "min_len": self.min_len, "max_len": self.max_len,
                "concentration": self.concentration, "n_sft": self.n_sft}

    # -- the gold reward ------------------------------------------------------------------------
    def gold_reward(self, prompt: Text, response: Text) -> float:
        """r*(x, y): the mean sentiment of the response's characters, in [-1, 1] (0 when empty)."""
        response = str(response)
        if not response:
            return 0.0
        return sum(self.sentiment.get(ch, 0.0) for ch in response) / len(response)

    # -- data for each stage --------------------------------------------------------------------
    def sft_examples(self, split: str = "train") -> list[RankedExample]:
        """Demonstrations: one response per prompt, drawn from the Markov chain."""
        count = self.n_sft if split == "train" else self.n_eval_prompts
        rng = random.Random(f"{self.seed}/sft/{split}")
        prompts = [self._prompt(rng) for _ in range(count)]
        return [RankedExample(prompt=p, responses=[self._demonstration(rng, p)],
                              meta={"source": "synthetic", "index": i}) for i, p in enumerate(prompts)]

    def preference_examples(self, split: str = "train", sample_fn: SampleFn | None = None,
                            n_responses: int | None = None) -> list[RankedExample]:
        """n responses per prompt sampled with ``sample_fn`` (the SFT policy), ranked by Plackett-Luce; with
        ``binary_threshold`` set, each of them alone instead, labelled by its gold reward (:meth:`judge_alone`)."""
        if sample_fn is None:
            raise ValueError("the synthetic task samples its preference data from a policy: pass sample_fn")
        n = n_responses or self.n_responses
        prompts = self.prompts(split)
        samples = sample_fn(prompts, n)
        if self.binary_threshold is not None:
            return [self.judge_alone(prompt, y, index=i) for i, (prompt, responses) in enumerate(zip(prompts, samples))
                    for y in responses]
        rng = random.Random(f"{self.seed}/labels/{split}")
        return [self.rank(prompt, responses, rng, index=i)
                for i, (prompt, responses) in enumerate(zip(prompts, samples))]

    @property
    def feedback(self) -> str:
        """What :meth:`preference_examples` gives: ``binary`` feedback where ``binary_threshold`` is set, else rankings."""
        return "binary" if self.binary_threshold is not None else "rankings"

    def judge_alone(self, prompt: str, response: str, index: int = 0) -> RankedExample:
        """Binary feedback on one sample: desirable where its gold reward r*(x, y) is at least ``binary_threshold``
        (the exact reward: no label noise)."""
        gold = self.gold_reward(prompt, response)
        return RankedExample(prompt=prompt, responses=[response], label=gold >= self.binary_threshold,
                             meta={"source": "synthetic", "index": index, "gold_rewards": [gold]})

    def rank(self, prompt: str, responses: Sequence[str], rng: random.Random, index: int = 0) -> RankedExample:
        """A Plackett-Luce draw on r*/tau (Gumbel-max); ties under tau = 0 keep their sampled order."""
        gold = [self.gold_reward(prompt, y) for y in responses]
        utilities = [r + self.tau * _gumbel(rng) if self.tau > 0 else r for r in gold]
        order = sorted(range(len(responses)), key=lambda i: -utilities[i])
        return RankedExample(prompt=prompt, responses=[responses[i] for i in order],
                             scores=[utilities[i] for i in order],
                             meta={"source": "synthetic", "index": index,
                                   "gold_rewards": [gold[i] for i in order]})

    def eval_examples(self) -> list[RankedExample]:
        """Held-out prompts of ``eval_split`` (``eval``, or ``validation`` for tuning), each with a
        demonstration as its reference response."""
        stream = "eval-targets" if self.eval_split == "eval" else f"{self.eval_split}-targets"
        rng = random.Random(f"{self.seed}/{stream}")
        return [RankedExample(prompt=p, responses=[self._demonstration(rng, p)], meta={"index": i})
                for i, p in enumerate(self.prompts(self.eval_split))]


def _dirichlet(rng: random.Random, k: int, alpha: float) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) + 1e-6 for _ in range(k)]
    total = sum(draws)
    return [d / total for d in draws]


def _gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(rng.random() + 1e-12) + 1e-12)
