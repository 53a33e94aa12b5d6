"""Overlap with reference texts: BLEU, chrF and TER (sacrebleu) and ROUGE-1/2/L (rouge-score).

All scores are on a 0-100 scale (sacrebleu's, and ROUGE F-measures times 100) so that one table
reads the same way. Corpus-level BLEU/chrF/TER (Papineni et al. 2002; Popović 2015; Snover et al.
2006) come with sacrebleu's signature string, which records tokenisation, smoothing and version so
that a number can be compared with another paper's; ROUGE (Lin 2004) is the mean of sentence-level
F-measures with its standard error. rouge-score's default tokenizer keeps only ``[a-z0-9]`` (after
lower-casing), so ROUGE is meaningful for English only; BLEU/chrF/TER handle any script (chrF is the
metric of choice for translation into morphologically rich languages).
"""

from __future__ import annotations

from collections.abc import Sequence

from alignexp.metrics.stats import bootstrap_interval, summary
from alignexp.tasks.base import Text

ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}


def plain_text(text: Text) -> str:
    """A response as one string: a message list gives its assistant turns' content (all content if none)."""
    if isinstance(text, str):
        return text
    assistant = [m["content"] for m in text if m.get("role") == "assistant"]
    return "\n".join(assistant or [m.get("content", "") for m in text])


def _check(hypotheses: Sequence[Text], references: Sequence[Text]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")


def corpus_scores(hypotheses: Sequence[Text], references: Sequence[Text], bootstrap: int = 0,
                  seed: int = 0) -> dict[str, float | str]:
    """Corpus BLEU, chrF and TER of ``hypotheses`` against one reference each, with signatures.

    Returns ``bleu``, ``chrf``, ``ter`` and ``bleu_signature``/``chrf_signature``/``ter_signature``;
    with ``bootstrap > 0``, also ``<metric>_ci_low``/``_ci_high``: a 95% percentile bootstrap interval
    over the test set's sentences (``bootstrap`` resamples).

    Worked example (tests/unit/test_metrics.py): hypothesis "the cat sat on the mat" (6 words),
    reference "the cat sat on the red mat" (7 words). Clipped n-gram precisions 6/6, 4/5, 3/4, 2/3;
    geometric mean (1 * 0.8 * 0.75 * 0.6667)^(1/4) = 0.4^(1/4) = 0.79527; brevity penalty
    exp(1 - 7/6) = 0.84648; BLEU = 100 * 0.79527 * 0.84648 = 67.32. TER: one insertion ("red") over
    7 reference words = 14.29.
    """
    from sacrebleu.metrics import BLEU, CHRF, TER

    _check(hypotheses, references)
    hyps = [plain_text(h) for h in hypotheses]
    refs = [plain_text(r) for r in references]
    out: dict[str, float | str] = {}
    for key, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        out[key] = float(metric.corpus_score(hyps, [refs]).score)
        out[f"{key}_signature"] = str(metric.get_signature())
        if bootstrap > 0 and hyps:
            low, high = bootstrap_interval(
                list(zip(hyps, refs)),
                lambda pairs, m=metric: float(m.corpus_score([h for h, _ in pairs], [[r for _, r in pairs]]).score),
                n_resamples=bootstrap, seed=seed)
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high
    return out


def sentence_bleu(hypotheses: Sequence[Text], references: Sequence[Text]) -> list[float]:
    """Sentence-level BLEU (sacrebleu, exponential smoothing, effective order), one per hypothesis."""
    from sacrebleu.metrics import BLEU

    _check(hypotheses, references)
    metric = BLEU(effective_order=True)
    return [float(metric.sentence_score(plain_text(h), [plain_text(r)]).score)
            for h, r in zip(hypotheses, references)]


def sentence_rouge(hypotheses: Sequence[Text], references: Sequence[Text],
                   use_stemmer: bool = True) -> dict[str, list[float]]:
    """ROUGE-1/2/L F-measures (times 100) per hypothesis: ``{"rouge_1": [...], "rouge_2": [...], "rouge_l": [...]}``.

    Worked example (tests/unit/test_metrics.py): hypothesis "the cat sat on the mat", reference
    "the cat sat on the red mat". ROUGE-1: 6 shared unigrams, P = 6/6, R = 6/7, F = 2PR/(P+R) =
    12/13 = 92.31. ROUGE-2: 4 shared bigrams of 5 and 6, F = 2(4/5)(4/6)/(4/5 + 4/6) = 8/11 = 72.73.
    ROUGE-L: the longest common subsequence is the whole hypothesis (6 words), so F = 12/13 = 92.31.
    """
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES.values()), use_stemmer=use_stemmer)
    out: dict[str, list[float]] = {key: [] for key in ROUGE_TYPES}
    for h, r in zip(hypotheses, references):
        scores = scorer.score(plain_text(r), plain_text(h))  # rouge-score's order: (target, prediction)
        for key, name in ROUGE_TYPES.items():
            out[key].append(100.0 * scores[name].fmeasure)
    return out


def reference_metrics(hypotheses: Sequence[Text], references: Sequence[Text], bootstrap: int = 0,
                      seed: int = 0) -> dict[str, float | str]:
    """Everything above for one system: corpus BLEU/chrF/TER (+ signatures) and mean ROUGE-1/2/L ± stderr."""
    out = corpus_scores(hypotheses, references, bootstrap=bootstrap, seed=seed)
    for key, values in sentence_rouge(hypotheses, references).items():
        out.update(summary(key, values))
    return out
