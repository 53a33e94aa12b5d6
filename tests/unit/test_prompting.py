"""Prompting baselines' prompts (alignexp/evaluation/prompting.py): the demonstrations, the task's own
format, truncation that keeps the query, and the answer cut where the model starts another example."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignexp.errors import ConfigError
from alignexp.evaluation.prompting import PromptingArgs, compose, demonstrations, few_shot_prompts, stop_at
from alignexp.models.backbone import ModelArgs, build_tokenizer
from alignexp.models.logprobs import encode_text
from alignexp.sampling.engine import Generation
from alignexp.tasks.tldr import TldrTask

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eval"
E1 = ("SUBREDDIT: r/cats\n\nTITLE: New cat hides all day\n\nPOST: I adopted a cat last week and she hides under "
      "the bed all day. She eats at night only.\n\nTL;DR:")
E2 = ("SUBREDDIT: r/cooking\n\nTITLE: Bread keeps coming out dense\n\nPOST: I follow the recipe exactly, let it "
      "rise for two hours, and it still comes out like a brick.\n\nTL;DR:")
E3 = ("SUBREDDIT: r/running\n\nTITLE: First half marathon next month\n\nPOST: I have been training for 12 weeks "
      "and my long runs are at 10 miles. My knees ache a bit after long runs.\n\nTL;DR:")


@pytest.fixture(scope="module")
def tldr():
    task = TldrTask(path=str(FIXTURES / "tldr_comparisons.jsonl"), sft_path=str(FIXTURES / "tldr_posts.jsonl"),
                    hub_id=None, sft_hub_id=None)
    return task, [ex.prompt for ex in task.eval_examples()], demonstrations(task, "train")


def test_the_exact_two_shot_prompt_of_a_fixture_example(tldr):
    """Held-out post e1 (the fixture's first) with seed 0: random.Random("0/0").sample(range(4), 3) draws
    posts [2, 1, 3]; e1 itself is never its own demonstration, so the two shots are e3 then e2, each as
    TL;DR's template writes a post and its summary (" " + summary after "TL;DR:"), joined by a blank
    line, then e1's prompt."""
    _, queries, pool = tldr
    assert len(pool) == 4 and queries[0] == E1
    prompts, info = few_shot_prompts(queries, pool, PromptingArgs(shots=2, seed=0), build_tokenizer(ModelArgs()),
                                     max_prompt_len=2048)
    assert prompts[0] == (E3 + " half marathon in a month, knees ache after long runs.\n\n"
                          + E2 + " my bread is always dense even though I follow the recipe.\n\n" + E1)
    assert info["mean_shots"] == 2 and info["truncated_prompts"] == 0 and info["example_prompt"] == prompts[0]
    for query, prompt in zip(queries, prompts):  # every prompt ends with its own query, never repeats it
        assert prompt.endswith(query) and prompt.count(query.split("\n")[0]) == 1
    again, _ = few_shot_prompts(queries, pool, PromptingArgs(shots=2, seed=0), build_tokenizer(ModelArgs()), 2048)
    other, _ = few_shot_prompts(queries, pool, PromptingArgs(shots=2, seed=1), build_tokenizer(ModelArgs()), 2048)
    assert again == prompts and other != prompts
    zero, info = few_shot_prompts(queries, [], PromptingArgs(shots=0), build_tokenizer(ModelArgs()), 2048)
    assert zero == queries and info["mean_shots"] == 0


def test_truncation_drops_the_farthest_demonstrations_and_keeps_the_query(tldr):
    """The byte-level tokenizer counts one token per byte plus BOS: with room for the query and one
    demonstration (not two), the first demonstration (the farthest from the query) is dropped."""
    _, queries, pool = tldr
    tokenizer = build_tokenizer(ModelArgs())
    one_shot = E2 + " my bread is always dense even though I follow the recipe.\n\n" + E1
    limit = len(encode_text(tokenizer, one_shot, is_prompt=True))
    prompts, info = few_shot_prompts(queries[:1], pool, PromptingArgs(shots=2), tokenizer, max_prompt_len=limit)
    assert prompts[0] == one_shot and info["truncated_prompts"] == 1 and info["mean_shots"] == 1
    prompts, info = few_shot_prompts(queries[:1], pool, PromptingArgs(shots=2), tokenizer, max_prompt_len=10)
    assert prompts[0] == E1 and info["mean_shots"] == 0  # the query alone, whole (the sampler cuts it as any)


def test_chat_prompts_take_demonstrations_as_earlier_turns():
    query = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    shots = [([{"role": "system", "content": "ignored"}, {"role": "user", "content": "A?"}], "a."), ("B?", "b.")]
    assert compose(query, shots, "\n\n") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"},
        {"role": "assistant", "content": "a."}, {"role": "user", "content": "B?"},
        {"role": "assistant", "content": "b."}, {"role": "user", "content": "Hi?"}]


def test_the_answer_stops_where_the_model_writes_the_separator():
    tokenizer = build_tokenizer(ModelArgs())
    ids = tokenizer(" a short summary.\n\nSUBREDDIT: r/x", add_special_tokens=False)["input_ids"]
    text, cut = stop_at(tokenizer, Generation(ids, [0.0] * len(ids), False), "\n\n")
    assert text == " a short summary." and cut.finished and tokenizer.decode(cut.token_ids) == text
    whole = Generation(ids[:5], [0.0] * 5, False)
    assert stop_at(tokenizer, whole, "\n\n") == (tokenizer.decode(ids[:5]), whole)


def test_bad_settings_name_the_key(tldr):
    _, queries, pool = tldr
    with pytest.raises(ConfigError, match="prompting.shots=4: the task's train split has 3 demonstrations"):
        few_shot_prompts(queries, pool, PromptingArgs(shots=4), build_tokenizer(ModelArgs()), 2048)
    with pytest.raises(ConfigError, match="prompting.shots"):
        PromptingArgs(shots=-1)
    assert PromptingArgs(shots=2).method == "2-shot prompting"
