"""TL;DR summarisation (Stiennon et al. 2020; the DPO paper's summarisation task).

* **SFT** on Reddit posts with their authors' TL;DRs: records as in ``trl-lib/tldr``
  (``prompt``, ``completion``: already formatted) or raw ``{subreddit, title, post, summary}``,
  formatted with :data:`PROMPT_TEMPLATE` and the completion ``" " + summary``.
* **Preferences** from the human comparisons of ``openai/summarize_from_feedback`` (``comparisons``):
  ``info{id, post, title, subreddit, site, article}`` (nullable fields), ``summaries[2]{text,
  policy, note}``, ``choice`` (0 or 1, the preferred summary), ``worker``, ``batch``, ``split``,
  ``extra{confidence}``. Comparisons whose ``post`` is null but whose ``article`` is set are CNN/DM
  articles, not TL;DR posts: they are left out and counted. Several comparisons of the same post
  are **grouped into one ranking** where they agree on a consistent total order (the preferences
  form an acyclic graph with a unique topological order); otherwise (a cycle, or an order they do
  not settle) the pairs are kept as they are. Responses are normalised to ``" " + text.strip()``.
* **Evaluation** on held-out posts (``eval_split`` of the SFT data): ``responses[0]`` and ``target``
  are the human summary.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from alignexp.tasks.base import DataError, LeftOut, RankedExample, get_field, number_value, text_field
from alignexp.tasks.loading import RecordTask, record_sources

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def format_prompt(post: str, title: str | None = None, subreddit: str | None = None) -> str:
    """:data:`PROMPT_TEMPLATE`; a missing subreddit or title drops its line."""
    if subreddit and title:
        return PROMPT_TEMPLATE.format(subreddit=subreddit, title=title, post=post)
    parts = []
    if subreddit:
        parts.append(f"SUBREDDIT: r/{subreddit}")
    if title:
        parts.append(f"TITLE: {title}")
    parts.append(f"POST: {post}")
    return "\n\n".join(parts) + "\n\nTL;DR:"


def format_summary(text: str) -> str:
    """A summary as it follows ``TL;DR:``: one leading space."""
    return " " + text.strip()


class TldrTask(RecordTask):
    """See the module docstring. ``path`` is the comparisons' local copy, ``sft_path`` the posts'."""

    def __init__(self, name: str = "tldr", path: str | None = None,
                 hub_id: str | None = "openai/summarize_from_feedback", hub_kwargs: dict[str, Any] | None = None,
                 split: str = "train", group_comparisons: bool = True,
                 sft_path: str | None = None, sft_hub_id: str | None = "trl-lib/tldr",
                 sft_split: str = "train", eval_split: str = "test", **common: Any):
        super().__init__(name, path, split, **common)
        self.hub_id, self.hub_kwargs = hub_id, dict(hub_kwargs or {})
        self.group_comparisons = group_comparisons
        self.sft_path, self.sft_hub_id = sft_path, sft_hub_id
        self.sft_split, self.eval_split = sft_split, eval_split

    # -- SFT and evaluation: posts with their human summaries ---------------------------------------
    def _posts(self, split: str, what: str) -> list[RankedExample]:
        sources = record_sources(self.sft_path, split, hub_id=self.sft_hub_id, path_key="task.sft_path")
        return self.load(sources, parse_post, what=what)

    def sft_examples(self, split: str | None = None) -> list[RankedExample]:
        return self._posts(self.resolve_split(split, self.sft_split), "sft")

    def eval_examples(self) -> list[RankedExample]:
        examples = self._posts(self.eval_split, "eval")
        for example in examples:
            example.target = example.responses[0]
        return self.eval_subset(examples)

    # -- preferences: human comparisons ----------------------------------------------------------------
    def preference_examples(self, split: str | None = None, sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]:
        """Rankings from the human comparisons (``sample_fn`` and ``n_responses`` are not used)."""
        sources = record_sources(self.path, self.resolve_split(split, self.split), hub_id=self.hub_id,
                                 hub_kwargs=self.hub_kwargs)
        def parse(record: Any, index: int, source: str) -> RankedExample | LeftOut:
            pair = parse_comparison(record, index, source)
            return LeftOut("CNN/DM article, not a TL;DR post") if pair is None else pair

        pairs = self.load(sources, parse, min_responses=2, what="comparisons")
        report = self.last_report
        examples = group_comparisons(pairs) if self.group_comparisons else pairs
        if len(examples) != len(pairs):
            report.examples = len(examples)
            merged = [ex for ex in examples if ex.meta.get("n_comparisons", 1) > 1]
            log.info("%s: %d comparisons -> %d examples (%d posts' %d consistent comparisons merged into "
                     "rankings)", self.name, len(pairs), len(examples), len(merged),
                     sum(ex.meta["n_comparisons"] for ex in merged))
        return self.rankings(examples)


def parse_post(record: Any, index: int, source: str) -> RankedExample:
    """A TL;DR post: ``{prompt, completion}`` (trl-lib/tldr) or ``{subreddit, title, post, summary}``."""
    if isinstance(record, dict) and "completion" in record:
        prompt = text_field(record, "prompt", source, index)
        completion = text_field(record, "completion", source, index)
        return RankedExample(prompt, [completion], meta={"source": source, "index": index})
    post = text_field(record, "post", source, index)
    summary = text_field(record, "summary", source, index)
    title = text_field(record, "title", source, index, optional=True)
    subreddit = text_field(record, "subreddit", source, index, optional=True)
    return RankedExample(format_prompt(post, title, subreddit), [format_summary(summary)],
                         meta={"source": source, "index": index, "id": record.get("id")})


def parse_comparison(record: Any, index: int, source: str) -> RankedExample | None:
    """One comparison as a pair (preferred summary first); None for a CNN/DM article."""
    info = get_field(record, "info", source, index)
    if not isinstance(info, dict):
        raise DataError(source, index, "info", f"expected an object, got {type(info).__name__}")
    if info.get("post") is None and info.get("article") is not None:
        return None
    post = text_field(info, "post", source, index, "info.post")
    title = text_field(info, "title", source, index, "info.title", optional=True)
    subreddit = text_field(info, "subreddit", source, index, "info.subreddit", optional=True)
    summaries = get_field(record, "summaries", source, index)
    if not isinstance(summaries, list) or len(summaries) != 2:
        found = f"{len(summaries)} summaries" if isinstance(summaries, list) else type(summaries).__name__
        raise DataError(source, index, "summaries", f"expected a list of 2 summaries, got {found}")
    texts = [text_field(s, "text", source, index, f"summaries[{j}].text") for j, s in enumerate(summaries)]
    choice = get_field(record, "choice", source, index)
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise DataError(source, index, "choice", f"expected 0 or 1, got {choice!r}")
    if choice not in (0, 1):
        raise DataError(source, index, "choice", f"out of range: expected 0 or 1, got {choice}")
    extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
    confidence = extra.get("confidence")
    if confidence is not None:
        confidence = number_value(confidence, source, index, "extra.confidence")
    order = [choice, 1 - choice]
    return RankedExample(
        prompt=format_prompt(post, title, subreddit),
        responses=[format_summary(texts[j]) for j in order],
        meta={"source": source, "index": index, "indices": [index], "post_id": info.get("id"),
              "policies": [summaries[j].get("policy") for j in order], "worker": record.get("worker"),
              "batch": record.get("batch"), "confidence": confidence})


def group_comparisons(pairs: list[RankedExample]) -> list[RankedExample]:
    """Merge the pairs of each post into one ranking where they agree on a consistent total order.

    The pairs of a post are edges winner -> loser between distinct summaries. When these edges form
    an acyclic graph whose topological order is unique (every step has exactly one summary that no
    remaining summary beats), that order is the ranking. Otherwise the post's pairs are kept as they
    are. Posts with a single comparison are returned unchanged. The output keeps first-seen order.
    """
    by_post: dict[Any, list[RankedExample]] = defaultdict(list)
    for pair in pairs:
        by_post[(pair.meta.get("post_id"), pair.prompt)].append(pair)
    out = []
    for group in by_post.values():
        ranking = _total_order(group) if len(group) > 1 else None
        if ranking is None:
            out.extend(group)
            continue
        meta = dict(group[0].meta)
        meta["indices"] = [i for pair in group for i in pair.meta["indices"]]
        meta["index"] = meta["indices"][0]
        meta["n_comparisons"] = len(group)
        policy = {r: p for pair in group for r, p in zip(pair.responses, pair.meta.get("policies") or ())}
        meta["policies"] = [policy.get(r) for r in ranking]
        out.append(RankedExample(group[0].prompt, ranking, meta=meta))
    return out


def _total_order(group: list[RankedExample]) -> list[str] | None:
    nodes: list[str] = []
    beats: dict[str, set[str]] = defaultdict(set)
    for pair in group:
        winner, loser = pair.responses
        if winner == loser:
            return None
        for text in (winner, loser):
            if text not in nodes:
                nodes.append(text)
        beats[winner].add(loser)
    indegree = {node: 0 for node in nodes}
    for losers in beats.values():
        for loser in losers:
            indegree[loser] += 1
    order = []
    ready = [node for node in nodes if indegree[node] == 0]
    while ready:
        if len(ready) > 1:
            return None  # two summaries that no comparison orders: not a total order
        node = ready.pop()
        order.append(node)
        for loser in beats[node]:
            indegree[loser] -= 1
            if indegree[loser] == 0:
                ready.append(loser)
    return order if len(order) == len(nodes) else None  # shorter: a cycle
