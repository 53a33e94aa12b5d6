"""Prompting baselines: a model (any ``model.path``, trained on nothing here) answers each held-out prompt
after k demonstrations from the task's training split, and is measured as a trained policy is (win rate
against the task's baseline, text metrics, gold reward; no KL, which is undefined when the prompts differ).
The DPO paper's zero-shot summarisation and 2-shot dialogue baselines. ``python -m alignexp.evaluate
mode=prompting``; docs/evaluation.md.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from alignexp.args import EvalArgs, check_number
from alignexp.errors import ConfigError
from alignexp.evaluation.policy import UNAVAILABLE, eval_setup, headline, measure, sample, sample_decoded
from alignexp.metrics.preference import prompt_key
from alignexp.metrics.winrate import Judge
from alignexp.models.logprobs import encode_text
from alignexp.sampling.engine import Generation, SamplingParams
from alignexp.sampling.text import decode
from alignexp.tasks.base import Message, Task, Text


@dataclass
class PromptingArgs:
    """``prompting`` (conf/evaluate.yaml): ``shots`` demonstrations per prompt, drawn with ``seed`` from
    the task's ``split`` (its SFT demonstrations; a task without them: the best response of its rankings),
    joined by ``separator`` (text prompts; chat prompts take them as earlier turns); the answer is cut at
    the first ``separator`` it writes where ``stop_at_separator`` (a base model goes on with another
    example otherwise)."""

    shots: int = 0
    seed: int = 0
    split: str = "train"
    separator: str = "\n\n"
    stop_at_separator: bool = True

    def __post_init__(self) -> None:
        check_number("prompting.shots", self.shots, low=0, integer=True)
        check_number("prompting.seed", self.seed, integer=True)

    @property
    def method(self) -> str:
        """The baseline's name in eval.json and the report: ``0-shot prompting``, ``2-shot prompting``."""
        return f"{self.shots}-shot prompting"


Demonstration = tuple[Text, Text]
"""(prompt, response) as the task writes them."""


def demonstrations(task: Task, split: str) -> list[Demonstration]:
    """The pool the demonstrations are drawn from: the task's SFT examples of ``split`` (their first
    response), else, for a task without SFT data, the best response of its rankings of ``split``."""
    try:
        examples = task.sft_examples(split)
    except UNAVAILABLE as sft_error:
        if task.samples_preferences:
            raise ConfigError(f"prompting.split={split}: task {task.name} has no demonstrations ({sft_error})") from None
        try:
            examples = task.preference_examples(split)
        except UNAVAILABLE as error:
            raise ConfigError(f"prompting.split={split}: task {task.name} has neither demonstrations nor rankings "
                              f"there ({sft_error}; {error})") from None
    return [(ex.prompt, ex.responses[0]) for ex in examples if ex.responses]


def _as_messages(text: Text) -> list[Message]:
    return [{"role": "user", "content": text}] if isinstance(text, str) else [dict(m) for m in text]


def compose(query: Text, shots: Sequence[Demonstration], separator: str) -> Text:
    """The k-shot prompt in the task's own format: for a text query, each demonstration's prompt and
    response as training concatenates them, then the query, joined by ``separator``; for a chat query,
    its system message, each demonstration's turns and its response as an assistant turn, then its turns."""
    if isinstance(query, str):
        for prompt, response in shots:
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise ConfigError("prompting: a text prompt takes text demonstrations; this task mixes text and chat")
        return separator.join([*(prompt + response for prompt, response in shots), query])
    system = [m for m in query if m.get("role") == "system"]
    turns: list[Message] = []
    for prompt, response in shots:
        turns += [m for m in _as_messages(prompt) if m.get("role") != "system"]
        turns += [{"role": "assistant", "content": response}] if isinstance(response, str) else _as_messages(response)
    return [*system, *turns, *[m for m in query if m.get("role") != "system"]]


def few_shot_prompts(queries: Sequence[Text], pool: Sequence[Demonstration], args: PromptingArgs, tokenizer,
                     max_prompt_len: int) -> tuple[list[Text], dict[str, Any]]:
    """Each query's k-shot prompt and what was done (``mean_shots``, ``truncated_prompts``).

    Query i draws ``shots`` demonstrations from ``pool`` with ``random.Random(f"{seed}/{i}")``, never one
    whose prompt is the query's. Where the prompt exceeds ``max_prompt_len`` tokens, demonstrations are
    dropped from the front (the farthest from the query) until it fits, so the query is kept whole.
    """
    keys = [prompt_key(p) for p, _ in pool]
    counts = Counter(keys)
    prompts: list[Text] = []
    used: list[int] = []
    truncated = 0
    for i, query in enumerate(queries):
        chosen: list[Demonstration] = []
        if args.shots:
            key = prompt_key(query)
            if len(pool) - counts[key] < args.shots:
                raise ConfigError(f"prompting.shots={args.shots}: the task's {args.split} split has "
                                  f"{len(pool) - counts[key]} demonstrations for held-out prompt {i}")
            rng = random.Random(f"{args.seed}/{i}")
            draws = rng.sample(range(len(pool)), min(len(pool), args.shots + counts[key]))
            chosen = [pool[j] for j in draws if keys[j] != key][:args.shots]
        prompt = compose(query, chosen, args.separator)
        if chosen and len(encode_text(tokenizer, prompt, is_prompt=True)) > max_prompt_len:
            truncated += 1
            while chosen and len(encode_text(tokenizer, prompt, is_prompt=True)) > max_prompt_len:
                chosen = chosen[1:]
                prompt = compose(query, chosen, args.separator)
        prompts.append(prompt)
        used.append(len(chosen))
    return prompts, {"shots": args.shots, "seed": args.seed, "split": args.split, "separator": args.separator,
                     "stop_at_separator": args.stop_at_separator, "pool": len(pool),
                     "mean_shots": sum(used) / max(1, len(used)), "truncated_prompts": truncated,
                     "example_prompt": prompts[0] if prompts else None}


def stop_at(tokenizer, generation: Generation, separator: str) -> tuple[str, Generation]:
    """The answer's text and tokens up to the first ``separator`` it writes (a stop sequence applied
    after generation, as lm-evaluation-harness's ``until``); unchanged where it writes none."""
    text = decode(tokenizer, generation)
    if not separator or separator not in text:
        return text, generation
    text = text[:text.index(separator)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, Generation(list(ids), list(generation.logprobs[:len(ids)]), True)


def evaluate_prompting(model, reference, tokenizer, task: Task, args: EvalArgs, prompting: PromptingArgs,
                       judge: Judge | None = None) -> dict:
    """``model`` prompted with ``prompting.shots`` demonstrations on the held-out prompts, measured as
    :func:`alignexp.evaluation.policy.evaluate_policy` measures a policy (its ``policy`` section), against
    ``reference``'s samples on the plain prompts (its ``reference`` section; None: no reference, then the
    baseline must be the dataset's responses). The result has a ``prompting`` section (what was done)."""
    start_time = time.time()
    prompts, references, baseline, use_references = eval_setup(task, args)
    if baseline == "reference" and reference is None:
        raise ConfigError(f"reference: the win rate on task {task.name} is against the reference's samples "
                          "(eval.baseline=reference, the default where the task has a gold reward): give "
                          "reference=<HF folder>, or eval.baseline=dataset")
    pool = demonstrations(task, prompting.split) if prompting.shots else []
    shot_prompts, info = few_shot_prompts(prompts, pool, prompting, tokenizer, args.max_prompt_len)
    by_temperature: dict[str, dict] = {}
    for temperature in args.temperatures:
        params = SamplingParams(temperature=float(temperature), max_new_tokens=args.max_new_tokens)
        generations = [row[0] for row in sample(model, tokenizer, shot_prompts, 1, params, args,
                                                f"sampling {prompting.method} (T={temperature:g})")]
        answers = [stop_at(tokenizer, g, prompting.separator if prompting.stop_at_separator else "")
                   for g in generations]
        samples = {"policy": ([text for text, _ in answers], [g for _, g in answers])}
        if reference is not None:
            samples["reference"] = sample_decoded(reference, tokenizer, prompts, params, args,
                                                  f"sampling reference (T={temperature:g})")
        by_temperature[f"{float(temperature):g}"] = measure(judge, task, prompts, samples, references, baseline,
                                                            args, use_references)
    result = headline(by_temperature, len(prompts))
    result["prompting"] = info
    result["eval_seconds"] = {"total": time.time() - start_time}
    return result
