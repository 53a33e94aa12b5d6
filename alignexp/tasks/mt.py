"""Machine translation with several scored candidates per source (ALMA-R / CPO, Xu et al. 2024).

* **Preferences** in the schema of ``haoranxu/ALMA-R-Preference`` (one hub config per language
  pair, ``cs-en``, ``de-en``, ``is-en``, ``ru-en``, ``zh-en``; split ``train``): each record holds
  ``translation{<xx>, <en>, gpt4_<tgt>, alma_<tgt>, <system>_<tgt>_<metric>, Delta, language_pair,
  required_directions}`` for both directions of its pair, where ``<system>`` is ``ref`` (the human
  reference ``<tgt>``), ``gpt4`` or ``alma`` and ``<metric>`` is ``kiwi`` (COMET-KIWI),
  ``xcomet`` (XCOMET) or ``kiwi_xcomet`` (their mean; ALMA-R's default scorer). Each selected
  direction becomes a 3-way ranking of (reference, GPT-4, ALMA) by ``task.rank_by``; equal scores
  are ties. A non-empty ``required_directions`` (``"en-cs"``) keeps only that direction, as ALMA-R
  does. The reference is also the example's ``target``. ``Delta`` is kept in ``meta``.
* **SFT** on parallel data: ``translation{<xx>, <en>}`` (``haoranxu/ALMA-Human-Parallel``), one
  example per selected direction, or plain ``{source, target}`` records (with optional
  ``source_lang``/``target_lang``; else the first of ``task.directions``).
* **Evaluation** on held-out parallel data (``haoranxu/WMT22-Test``: one config per direction,
  records ``{"cs-en": {cs, en}}``; or the formats above), the reference as ``responses[0]``/``target``.

Prompts follow ALMA: ``Translate this from {Src} to {Tgt}:\\n{Src}: {x}\\n{Tgt}:`` with full language
names; a translation follows as ``" " + text``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignexp.tasks.base import (
    DataError,
    LeftOut,
    RankedExample,
    get_field,
    number_value,
    sort_by_scores,
    text_field,
)
from alignexp.tasks.loading import RecordSource, RecordTask, record_sources

LANGUAGES = {
    "en": "English", "de": "German", "cs": "Czech", "is": "Icelandic", "zh": "Chinese", "ru": "Russian",
    "fr": "French", "es": "Spanish", "it": "Italian", "pt": "Portuguese", "nl": "Dutch", "ja": "Japanese",
    "ko": "Korean", "uk": "Ukrainian", "pl": "Polish", "ro": "Romanian", "ha": "Hausa", "gu": "Gujarati",
    "tr": "Turkish", "ar": "Arabic", "hi": "Hindi", "fi": "Finnish", "et": "Estonian", "lt": "Lithuanian",
}
METRICS = ("kiwi_xcomet", "xcomet", "kiwi")
SYSTEMS = ("ref", "gpt4", "alma")
PROMPT_TEMPLATE = "Translate this from {src} to {tgt}:\n{src}: {text}\n{tgt}:"

Direction = tuple[str, str]


def parse_direction(value: str, key: str) -> Direction:
    """``"cs-en"`` -> ``("cs", "en")``, both known language codes (a ValueError naming ``key`` otherwise)."""
    parts = str(value).split("-")
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise ValueError(f"{key}: expected a language pair like 'cs-en', got {value!r}")
    unknown = [code for code in parts if code not in LANGUAGES]
    if unknown:
        raise ValueError(f"{key}: unknown language code {unknown[0]!r} (known: {', '.join(sorted(LANGUAGES))})")
    return parts[0], parts[1]


def translation_prompt(src: str, tgt: str, text: str) -> str:
    return PROMPT_TEMPLATE.format(src=LANGUAGES[src], tgt=LANGUAGES[tgt], text=text)


def format_translation(text: str) -> str:
    return " " + text.strip()


class TranslationTask(RecordTask):
    """See the module docstring.

    Args (besides :class:`RecordTask`'s):
        language_pairs: the preference data's pairs (hub configs), e.g. ``["cs-en", "de-en"]``.
        directions: the directions to train and evaluate, e.g. ``["en-cs"]``; None: both directions
            of every pair.
        rank_by: the metric that ranks the candidates: ``kiwi_xcomet``, ``xcomet`` or ``kiwi``.
    """

    def __init__(self, name: str = "mt", path: str | None = None, hub_id: str | None = "haoranxu/ALMA-R-Preference",
                 language_pairs: Sequence[str] = ("cs-en",), directions: Sequence[str] | None = None,
                 rank_by: str = "kiwi_xcomet", split: str = "train",
                 sft_path: str | None = None, sft_hub_id: str | None = "haoranxu/ALMA-Human-Parallel",
                 sft_split: str = "train", eval_path: str | None = None,
                 eval_hub_id: str | None = "haoranxu/WMT22-Test", eval_split: str = "test", **common: Any):
        if rank_by not in METRICS:
            raise ValueError(f"task.rank_by must be one of {', '.join(METRICS)}, got {rank_by!r}")
        if isinstance(language_pairs, str):
            language_pairs = [language_pairs]
        if not language_pairs:
            raise ValueError("task.language_pairs must name at least one pair, e.g. [cs-en]")
        pairs = [parse_direction(p, "task.language_pairs") for p in language_pairs]
        if directions is None:
            chosen = [d for src, tgt in pairs for d in ((src, tgt), (tgt, src))]
        else:
            if isinstance(directions, str):
                directions = [directions]
            chosen = [parse_direction(d, "task.directions") for d in directions]
            known = {frozenset(p) for p in pairs}
            for src, tgt in chosen:
                if frozenset((src, tgt)) not in known:
                    raise ValueError(f"task.directions: {src}-{tgt} is not a direction of task.language_pairs "
                                     f"({', '.join(language_pairs)})")
        super().__init__(name, path, split, **common)
        self.hub_id, self.rank_by = hub_id, rank_by
        self.language_pairs = [f"{a}-{b}" for a, b in pairs]
        self.directions: list[Direction] = list(dict.fromkeys(chosen))
        self.sft_path, self.sft_hub_id, self.sft_split = sft_path, sft_hub_id, sft_split
        self.eval_path, self.eval_hub_id, self.eval_split = eval_path, eval_hub_id, eval_split

    def _sources(self, path: str | None, split: str, hub_id: str | None, configs: Sequence[str],
                 path_key: str) -> list[RecordSource]:
        sources: dict[str, RecordSource] = {}
        for config in configs:  # one local file serves every config: read it once
            for source in record_sources(path, split, hub_id=hub_id, config=config, path_key=path_key):
                sources.setdefault(source.name, source)
        return list(sources.values())

    def preference_examples(self, split: str | None = None, sample_fn=None,
                            n_responses: int | None = None) -> list[RankedExample]:
        """3-way rankings (reference, GPT-4, ALMA) per direction; ``sample_fn``/``n_responses`` are not used."""
        split = self.resolve_split(split, self.split)
        sources = self._sources(self.path, split, self.hub_id, self.language_pairs, "task.path")

        def parse(record: Any, index: int, source: str) -> list[RankedExample] | LeftOut:
            examples = parse_preference(record, index, source, self.directions, self.rank_by)
            return examples or LeftOut(self._left_out_reason(record["translation"]))

        return self.rankings(self.load(sources, parse, min_responses=2, what="preferences"))

    def _left_out_reason(self, row: dict) -> str:
        """Why a preference record gave no ranking: the setting that leaves its pair or direction out."""
        pair, required = row["language_pair"], row.get("required_directions") or ""
        if frozenset(pair.split("-")) not in {frozenset(p.split("-")) for p in self.language_pairs}:
            return f"language_pair {pair} not in task.language_pairs=[{', '.join(self.language_pairs)}]"
        directions = ", ".join(f"{s}-{t}" for s, t in self.directions)
        if required:
            return f"required_directions {required} not in task.directions=[{directions}]"
        return f"no direction of {pair} in task.directions=[{directions}]"

    def _parallel(self, path, split, hub_id, configs, path_key, what) -> list[RankedExample]:
        sources = self._sources(path, split, hub_id, configs, path_key)
        directions = ", ".join(f"{s}-{t}" for s, t in self.directions)

        def parse(record: Any, index: int, source: str) -> list[RankedExample] | LeftOut:
            examples = parse_parallel(record, index, source, self.directions)
            return examples or LeftOut(f"no direction of the record in task.directions=[{directions}]")

        return self.load(sources, parse, what=what)

    def sft_examples(self, split: str | None = None) -> list[RankedExample]:
        return self._parallel(self.sft_path, self.resolve_split(split, self.sft_split), self.sft_hub_id,
                              self.language_pairs, "task.sft_path", "sft")

    def eval_examples(self) -> list[RankedExample]:
        configs = [f"{src}-{tgt}" for src, tgt in self.directions]
        examples = self._parallel(self.eval_path, self.eval_split, self.eval_hub_id, configs,
                                  "task.eval_path", "eval")
        for example in examples:
            example.target = example.responses[0]
        return self.eval_subset(examples)


def parse_preference(record: Any, index: int, source: str, directions: Sequence[Direction],
                     rank_by: str) -> list[RankedExample]:
    """The rankings of one ALMA-R-Preference record, one per selected direction."""
    row = get_field(record, "translation", source, index)
    if not isinstance(row, dict):
        raise DataError(source, index, "translation", f"expected an object, got {type(row).__name__}")
    pair_text = text_field(row, "language_pair", source, index, "translation.language_pair")
    try:
        pair = parse_direction(pair_text, "language_pair")
    except ValueError as error:
        raise DataError(source, index, "translation.language_pair", str(error).split(": ", 1)[1]) from None
    required = row.get("required_directions") or ""
    if required and not isinstance(required, str):
        raise DataError(source, index, "translation.required_directions",
                        f"expected a string like 'en-cs', got {type(required).__name__}")
    examples = []
    for src, tgt in directions:
        if {src, tgt} != set(pair) or (required and required != f"{src}-{tgt}"):
            continue
        text = text_field(row, src, source, index, f"translation.{src}")
        candidates, scores = [], []
        for system in SYSTEMS:
            key = tgt if system == "ref" else f"{system}_{tgt}"
            candidates.append((system, format_translation(text_field(row, key, source, index, f"translation.{key}"))))
            score_key = f"{system}_{tgt}_{rank_by}"
            scores.append(number_value(get_field(row, score_key, source, index, f"translation.{score_key}"),
                                       source, index, f"translation.{score_key}"))
        ranked, ranked_scores = sort_by_scores(candidates, scores)
        reference = candidates[0][1]
        examples.append(RankedExample(
            translation_prompt(src, tgt, text), [t for _, t in ranked], scores=ranked_scores, target=reference,
            meta={"source": source, "index": index, "direction": f"{src}-{tgt}",
                  "systems": [s for s, _ in ranked], "delta": row.get("Delta"), "rank_by": rank_by}))
    return examples


def parse_parallel(record: Any, index: int, source: str, directions: Sequence[Direction]) -> list[RankedExample]:
    """Parallel text as demonstrations, one per selected direction the record has both sides of."""
    if not isinstance(record, dict):
        raise DataError(source, index, "<record>", f"expected an object, got {type(record).__name__}")
    if "source" in record or "target" in record:
        text = text_field(record, "source", source, index)
        translation = text_field(record, "target", source, index)
        src, tgt = record.get("source_lang"), record.get("target_lang")
        if src is None and tgt is None and isinstance(record.get("language_pair"), str):
            src, _, tgt = record["language_pair"].partition("-")
        if src is None and tgt is None:
            src, tgt = directions[0]
        if (src, tgt) not in directions:
            return []
        return [_demonstration(src, tgt, text, translation, source, index)]
    candidates: list[tuple[str, dict, Sequence[Direction]]] = []
    if isinstance(record.get("translation"), dict):
        candidates.append(("translation", record["translation"], directions))
    for src, tgt in directions:
        if isinstance(record.get(f"{src}-{tgt}"), dict):
            candidates.append((f"{src}-{tgt}", record[f"{src}-{tgt}"], [(src, tgt)]))
    if not candidates:
        wanted = ", ".join(f"{s}-{t}" for s, t in directions)
        raise DataError(source, index, "<record>", f"no parallel text for {wanted}: expected {{source, target}}, "
                        f"translation{{<src>, <tgt>}} or {{'<src>-<tgt>': {{<src>, <tgt>}}}}; found {sorted(record)}")
    examples = []
    for key, sides, wanted in candidates:
        for src, tgt in wanted:
            if src in sides or tgt in sides:
                text = text_field(sides, src, source, index, f"{key}.{src}")
                translation = text_field(sides, tgt, source, index, f"{key}.{tgt}")
                examples.append(_demonstration(src, tgt, text, translation, source, index))
    return examples


def _demonstration(src: str, tgt: str, text: str, translation: str, source: str, index: int) -> RankedExample:
    return RankedExample(translation_prompt(src, tgt, text), [format_translation(translation)],
                         meta={"source": source, "index": index, "direction": f"{src}-{tgt}"})
