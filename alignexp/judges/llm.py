"""An LLM judge behind any OpenAI-compatible chat-completions endpoint, over plain HTTP (urllib).

* **Prompts**: the DPO paper's GPT-4 win-rate prompts (Rafailov et al. 2023, Appendix C.2):
  ``summarization`` (prompt S), ``summarization_concise`` (prompt C, the one that asks for concision)
  and ``dialogue``. The judge answers with a one-sentence comparison, then ``Preferred: A|B``
  (``More helpful: A|B`` for dialogue).
* **Position bias**: each comparison is asked in both orders (first as A, then first as B); the
  verdict is the mean of the valid votes, so a judge that always answers "A" gives 0.5.
* **Failures never crash a run**: a timeout, a connection error, a 429 or 5xx, or a reply that cannot
  be parsed is retried with exponential backoff (``backoff_s * 2^attempt``, at most ``max_backoff_s``,
  or the server's ``Retry-After`` within that cap), at most ``max_retries`` times; then the request
  **abstains**. A comparison without a single valid vote returns 0.5 and is counted in
  ``stats["abstentions"]``. Configuration errors (HTTP 401, 403, 404: wrong key, URL or model) raise
  :class:`JudgeConfigError` at once, since every request would fail the same way.
* **Chat**: a request is a list of messages: the system message ``system_prompt`` (none by default) and
  the user message; :meth:`LLMJudge.chat` sends any list (MT-Bench grading sends FastChat's system and
  user prompts, alignexp/evaluation/exports.py) and returns the reply's text.
* **Cache**: replies that parsed are kept in memory and, with ``cache_dir``, on disk, one JSON file per
  request named by the SHA-256 of the request (URL, model, every message, temperature, max_tokens), so
  repeated comparisons, reruns and resumed evaluations ask nothing twice. (An evaluation that swaps
  the pair itself, as ``alignexp.metrics.winrate`` does, finds the swapped requests cached; set
  ``both_orders: false`` there to measure the judge's position bias.)
* **API key**: read from the environment variable named by ``api_key_env`` when a request is sent;
  it is never stored on the judge, in the cache, in ``stats`` or in any log message.

``score`` (pointwise) asks for a 1-10 rating (``Rating: [[n]]``); it returns NaN for an abstention.
``rank`` compares every pair (:func:`alignexp.judges.base.rank_by_comparisons`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from alignexp.errors import AlignexpError
from alignexp.files import atomic_write_text
from alignexp.judges.base import rank_by_comparisons
from alignexp.tasks.base import Message, RankedExample, Text

log = logging.getLogger(__name__)

_FORMAT = (
    "FIRST provide a one-sentence comparison of the two {things}, explaining which you {verb}. "
    "SECOND, on a new line, state only \"A\" or \"B\" to indicate {which}. "
    "Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    "{label}: <\"A\" or \"B\">"
)

PROMPTS: dict[str, str] = {
    "summarization": (
        "Which of the following summaries does a better job of summarizing the most important points in the "
        "given forum post?\n\nPost:\n{prompt}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n"
        + _FORMAT.format(things="summaries", verb="prefer and why", which="your choice", label="Preferred")),
    "summarization_concise": (
        "Which of the following summaries does a better job of summarizing the most important points in the "
        "given forum post, without including unimportant or irrelevant details? A good summary is both "
        "precise and concise.\n\nPost:\n{prompt}\n\nSummary A:\n{a}\n\nSummary B:\n{b}\n\n"
        + _FORMAT.format(things="summaries", verb="prefer and why", which="your choice", label="Preferred")),
    "dialogue": (
        "For the following query to a chatbot, which response is more helpful?\n\nQuery: {prompt}\n\n"
        "Response A:\n{a}\n\nResponse B:\n{b}\n\n"
        + _FORMAT.format(things="responses", verb="feel is more helpful",
                         which="which response is more helpful", label="More helpful")),
}
"""The DPO paper's pairwise prompts (Appendix C.2), keyed by ``kind``."""

VERDICT_LABELS = {"summarization": "Preferred", "summarization_concise": "Preferred", "dialogue": "More helpful"}

RATING_PROMPT = (
    "Rate the quality of the response to the following {what} on a scale of 1 to 10, where 10 is best.\n\n"
    "{prompt}\n\nResponse:\n{response}\n\n"
    "FIRST provide a one-sentence explanation. SECOND, on a new line, give the rating in the format:\n"
    "Rating: [[<a number from 1 to 10>]]"
)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
FATAL_STATUS = frozenset({401, 403, 404})


class JudgeConfigError(AlignexpError, RuntimeError):
    """The endpoint refuses every request (bad key, URL or model): fix the judge's config."""


def render(text: Text) -> str:
    """A prompt or response as plain text; chat messages become ``role: content`` lines."""
    if isinstance(text, str):
        return text
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in text)


def parse_verdict(reply: str, label: str) -> str | None:
    """``"A"`` or ``"B"`` from the last ``<label>: A|B`` line of ``reply``; None when there is none."""
    matches = re.findall(rf"{re.escape(label)}\s*:\s*[\"'<*\s]*([AB])\b", reply, flags=re.IGNORECASE)
    return matches[-1].upper() if matches else None


def parse_rating(reply: str) -> float | None:
    """The number in the last ``Rating: [[n]]`` of ``reply`` (1..10); None when there is none."""
    matches = re.findall(r"Rating\s*:\s*\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", reply, flags=re.IGNORECASE)
    if not matches:
        return None
    value = float(matches[-1])
    return value if 1 <= value <= 10 else None


class LLMJudge:
    """See the module docstring. ``stats`` counts requests, cache hits, retries and failures by kind,
    and abstentions (comparisons with no valid vote, ratings with no valid reply)."""

    name = "llm"

    def __init__(self, base_url: str | None = None, model: str | None = None, *, kind: str = "summarization",
                 api_key_env: str | None = "OPENAI_API_KEY", timeout_s: float = 60.0, max_retries: int = 4,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0, cache_dir: str | Path | None = None,
                 max_tokens: int = 256, temperature: float = 0.0, max_workers: int = 4,
                 both_orders: bool = True, system_prompt: str | None = None, **_: Any):
        if kind not in PROMPTS:
            raise ValueError(f"judge.kind must be one of {', '.join(PROMPTS)}, got {kind!r}")
        if not base_url:
            raise ValueError("judge.base_url: the llm judge needs an OpenAI-compatible endpoint, "
                             "e.g. http://localhost:8000/v1")
        if not model:
            raise ValueError("judge.model: the llm judge needs the endpoint's model name, e.g. gpt-4-0314")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("judge.max_retries must be >= 0, judge.timeout_s > 0 and judge.backoff_s >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.kind, self.api_key_env = model, kind, api_key_env
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.max_workers, self.both_orders = max(1, int(max_workers)), both_orders
        self.system_prompt = system_prompt or None
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._memory: dict[str, str] = {}  # replies that parsed, by request hash (also without cache_dir)

    def __repr__(self) -> str:  # never shows the key (it is not stored anyway)
        return f"LLMJudge(url={self.url!r}, model={self.model!r}, kind={self.kind!r}, api_key_env={self.api_key_env!r})"

    @property
    def abstentions(self) -> int:
        return self.stats["abstentions"]

    # -- one request ----------------------------------------------------------------------------
    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.stats[key] += amount

    def messages(self, content: str) -> list[Message]:
        """The request for one prompt: the judge's system message (where it has one), then the user message."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": content}]

    def _request_key(self, messages: Sequence[Message], max_tokens: int | None = None) -> tuple[dict, str]:
        """The request body and its cache key, the SHA-256 of the URL and the body (every message)."""
        body = {"model": self.model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                "temperature": self.temperature, "max_tokens": int(max_tokens or self.max_tokens)}
        digest = hashlib.sha256(json.dumps({"url": self.url, **body}, sort_keys=True).encode()).hexdigest()
        return body, digest

    def _cache_path(self, digest: str) -> Path | None:
        return self.cache_dir / digest[:2] / f"{digest}.json" if self.cache_dir else None

    def _post(self, body: dict) -> tuple[int | None, str, float | None]:
        """(HTTP status or None for a network failure, the reply text or the failure's kind, Retry-After)."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read().decode("utf-8", errors="replace"), None
        except urllib.error.HTTPError as error:
            retry_after = error.headers.get("Retry-After") if error.headers else None
            try:
                wait = float(retry_after) if retry_after is not None else None
            except ValueError:
                wait = None
            return error.code, f"http_{error.code}", wait
        except TimeoutError:
            return None, "timeout", None
        except urllib.error.URLError as error:
            kind = "timeout" if isinstance(error.reason, TimeoutError) else "connection_error"
            return None, kind, None
        except (ConnectionError, OSError):
            return None, "connection_error", None

    def ask(self, request: str | Sequence[Message], parse, max_tokens: int | None = None) -> Any:
        """The parsed reply (``parse(text) -> value | None``) to ``request``, a list of messages or a user
        message's text (sent after the judge's system message), or None (abstention)."""
        messages = self.messages(request) if isinstance(request, str) else list(request)
        if not messages or any(not isinstance(m, dict) or not isinstance(m.get("content"), str)
                               or m.get("role") not in ("system", "user", "assistant") for m in messages):
            raise ValueError("an LLM judge request is a non-empty list of {role: system|user|assistant, "
                             "content: str} messages")
        body, digest = self._request_key(messages, max_tokens)
        path = self._cache_path(digest)
        cached = self._memory.get(digest)
        if cached is None and path is not None and path.exists():
            try:
                cached = json.loads(path.read_text())["reply"]
            except (json.JSONDecodeError, KeyError, OSError):
                cached = None
        if cached is not None:
            value = parse(cached)
            if value is not None:
                self._count("cache_hits")
                return value
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            status, text, retry_after = self._post(body)
            failure = None
            if status is not None and status in FATAL_STATUS:
                raise JudgeConfigError(
                    f"judge endpoint {self.url} answered HTTP {status} for model '{self.model}': check judge.base_url, "
                    f"judge.model and the API key in the environment variable {self.api_key_env!r}")
            if status is None or status >= 400:
                failure = text
                if status is not None and status not in RETRY_STATUS:
                    self._count(f"failed_{failure}")
                    break
            else:
                reply = _message_content(text)
                value = parse(reply) if reply is not None else None
                if value is not None:
                    with self._lock:
                        self._memory[digest] = reply
                    if path is not None:
                        atomic_write_text(path, json.dumps({"request": body, "reply": reply}))
                    return value
                failure = "unparseable"
            self._count(f"failed_{failure}")
            if attempt < self.max_retries:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
                if retry_after is not None:
                    delay = min(self.max_backoff_s, max(delay, retry_after))
                time.sleep(delay * (1 + 0.1 * random.random()))
        self._count("abstained_requests")
        return None

    def chat(self, messages: Sequence[Message], max_tokens: int | None = None) -> str:
        """The reply's text to a list of messages (the empty string where the judge abstained)."""
        reply = self.ask(list(messages), lambda text: text if text.strip() else None, max_tokens)
        return reply if reply is not None else ""

    def _map(self, fn, items: list) -> list:
        """``fn`` over ``items`` (``max_workers`` requests at a time), with a progress bar on a terminal: items
        done, rate and ETA, and the retries and failed requests so far (:meth:`faults`)."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=f"judge {self.model}", unit="call", leave=False, disable=None,
                   dynamic_ncols=True) if len(items) > 1 else None

        def tracked(item):
            result = fn(item)
            if bar is not None:
                bar.set_postfix_str(self.faults(), refresh=False)
                bar.update(1)
            return result

        try:
            if self.max_workers == 1 or len(items) <= 1:
                return [tracked(item) for item in items]
            with ThreadPoolExecutor(self.max_workers) as pool:
                return list(pool.map(tracked, items))
        finally:
            if bar is not None:
                bar.close()

    def faults(self) -> str:
        """``retries R, failed F, abstained A``: the judge's troubles so far (from ``stats``)."""
        with self._lock:
            failed = sum(v for k, v in self.stats.items() if k.startswith("failed_"))
            return f"retries {self.stats['retries']}, failed {failed}, abstained {self.stats['abstentions']}"

    # -- the judge interface --------------------------------------------------------------------
    def _pair_prompt(self, prompt: Text, a: Text, b: Text) -> str:
        return PROMPTS[self.kind].format(prompt=render(prompt), a=render(a), b=render(b))

    def compare(self, prompts: Sequence[Text], first: Sequence[Text], second: Sequence[Text]) -> list[float]:
        """1 where ``first`` wins, 0 where ``second`` wins, 0.5 for a split vote or an abstention."""
        label = VERDICT_LABELS[self.kind]

        def vote(item: tuple[Text, Text, Text, bool]) -> float | None:
            prompt, x, y, swapped = item
            verdict = self.ask(self._pair_prompt(prompt, y, x) if swapped else self._pair_prompt(prompt, x, y),
                               lambda reply: parse_verdict(reply, label))
            if verdict is None:
                return None
            return float((verdict == "A") != swapped)  # 1 when the vote is for ``first``

        orders = (False, True) if self.both_orders else (False,)
        items = [(p, x, y, s) for p, x, y in zip(prompts, first, second) for s in orders]
        votes = self._map(vote, items)
        out = []
        for i in range(len(prompts)):
            valid = [v for v in votes[i * len(orders):(i + 1) * len(orders)] if v is not None]
            if not valid:
                self._count("abstentions")
                out.append(0.5)
            else:
                out.append(sum(valid) / len(valid))
        return out

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        """A 1-10 rating per response (NaN where the judge abstained, counted in ``stats``)."""
        what = "forum post to summarize" if self.kind.startswith("summarization") else "query to a chatbot"

        def rate(item: tuple[Text, Text]) -> float:
            prompt, response = item
            value = self.ask(RATING_PROMPT.format(what=what, prompt=render(prompt), response=render(response)),
                             parse_rating)
            if value is None:
                self._count("abstentions")
                return math.nan
            return value

        return self._map(rate, list(zip(prompts, responses)))

    def rank(self, prompt: Text, responses: Sequence[Text], meta: dict[str, Any] | None = None) -> RankedExample:
        """Responses best first by their pairwise wins (each pair asked in both orders)."""
        return rank_by_comparisons(self, prompt, responses, meta)

    def rank_all(self, prompts: Sequence[Text], candidates: Sequence[Sequence[Text]],
                 metas: Sequence[dict[str, Any]] | None = None) -> list[RankedExample]:
        return [self.rank(p, rs, metas[i] if metas else None) for i, (p, rs) in enumerate(zip(prompts, candidates))]


def _message_content(text: str) -> str | None:
    """``choices[0].message.content`` of a chat-completions reply; None when the body is not one."""
    try:
        content = json.loads(text)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
