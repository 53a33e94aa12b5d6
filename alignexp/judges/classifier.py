"""A sequence classifier as a judge, and as a task's gold reward (the DPO paper's IMDb sentiment classifier).

The classifier reads text (``input``: the prompt and the response joined by a space, as a review prefix and
its continuation; or the response alone) and scores it by its positive class: ``output: logit`` gives that
class's log-odds, log p(pos) - log(1 - p(pos)); ``output: probability`` gives p(pos) (the DPO paper's reward
for IMDb is the classifier's positive probability). Two kinds of classifier are read:

* a Hugging Face sequence-classification folder or hub id (e.g. ``siebert/sentiment-roberta-large-english``,
  the DPO paper's judge); ``positive_label`` names its positive class in ``config.id2label`` (its index also
  works). Batched, on the run's device, in eval mode, without gradients;
* the offline asset ``sentiment-judge`` (:mod:`alignexp.assets`): a scikit-learn TF-IDF + logistic-regression
  pipeline whose positive class is label 1; its held-out accuracy is read from its manifest.

``path``: a folder or hub id; with ``asset`` too, the hub id is used where the hub is reachable and the asset
where it is not (:func:`alignexp.assets.choose_source`). Scores are deterministic (same text, same score).
:meth:`ClassifierJudge.identity` (the source, the file digests, the accuracy) goes into eval.json and, through
the task's config, into the keys of the caches that hold judged rankings.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignexp.errors import ConfigError
from alignexp.judges.base import ScoreJudge
from alignexp.tasks.base import Text

OUTPUTS = ("logit", "probability")
INPUTS = ("prompt_and_response", "response")


def render(text: Text) -> str:
    if isinstance(text, str):
        return text
    return "\n".join(str(m.get("content", "")) for m in text)


class ClassifierJudge(ScoreJudge):
    """See the module docstring."""

    name = "classifier"

    def __init__(self, path: str | None = None, asset: str | None = None, *, output: str = "logit",
                 input: str = "prompt_and_response", positive_label: str | int = "POSITIVE",
                 batch_size: int = 64, max_length: int = 512, device: Any = "cpu",
                 cache_dir: str | None = None, **_: Any):
        if output not in OUTPUTS:
            raise ConfigError(f"judge.output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if input not in INPUTS:
            raise ConfigError(f"judge.input must be one of {', '.join(INPUTS)}, got {input!r}")
        if not path and not asset:
            raise ConfigError("judge.path: the classifier judge needs a sequence-classification folder or hub id "
                              "(judge.path), or an offline asset (judge.asset=sentiment-judge)")
        from alignexp.assets import MANIFEST, choose_source

        self.source = choose_source(path, asset, cache_dir, key="judge.path") if asset else None
        self.path = self.source.path if self.source else str(path)
        self.output, self.input, self.batch_size, self.max_length = output, input, int(batch_size), int(max_length)
        folder = Path(self.path).expanduser()
        manifest = folder / MANIFEST
        self.manifest = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else None
        from alignexp.assets import JUDGE_FILE

        if (folder / JUDGE_FILE).is_file():
            self.kind = "sklearn"
            self._load_sklearn(folder / JUDGE_FILE)
        else:
            self.kind = "transformers"
            self._load_transformers(positive_label, device)

    # -- loading ---------------------------------------------------------------------------------
    def _load_sklearn(self, file: Path) -> None:
        from alignexp.files import file_sha256

        expected = (self.manifest or {}).get("files_sha256", {}).get(file.name)
        if expected is not None and file_sha256(file) != expected:
            raise ConfigError(f"judge.path={self.path}: {file.name} differs from its manifest's sha256; rebuild the "
                              f"asset (delete the folder, then `python -m alignexp.assets fetch sentiment-judge`)")
        try:
            with open(file, "rb") as handle:
                self.pipeline = pickle.load(handle)  # built by alignexp.assets on this machine, digest checked
        except ImportError as error:
            raise ConfigError(f"judge.path={self.path}: the scikit-learn judge needs scikit-learn "
                              f"(pip install 'alignexp[assets]'): {error}") from None
        classes = [int(c) for c in self.pipeline.classes_]
        self.positive_index = classes.index(1)

    def _load_transformers(self, positive_label: str | int, device: Any) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from alignexp.models.backbone import _from_pretrained

        self.tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, self.path, "classifier's tokenizer")
        model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, self.path, "classifier",
                                 dtype=torch.float32)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        labels = {str(v).lower(): int(k) for k, v in (model.config.id2label or {}).items()}
        if isinstance(positive_label, int) or str(positive_label).isdigit():
            index = int(positive_label)
        elif str(positive_label).lower() in labels:
            index = labels[str(positive_label).lower()]
        else:
            raise ConfigError(f"judge.positive_label={positive_label!r}: {self.path} has the labels "
                              f"{sorted(labels)}; name the positive one (or give its index)")
        if not 0 <= index < model.config.num_labels or model.config.num_labels < 2:
            raise ConfigError(f"judge.positive_label={positive_label!r}: {self.path} has {model.config.num_labels} "
                              f"labels; a classifier judge needs at least 2 and the positive one among them")
        self.positive_index = index

    # -- scoring ---------------------------------------------------------------------------------
    def texts(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[str]:
        if self.input == "response":
            return [render(r) for r in responses]
        return [" ".join(part for part in (render(p).strip(), render(r).strip()) if part)
                for p, r in zip(prompts, responses)]

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        texts = self.texts(prompts, responses)
        if not texts:
            return []
        if self.kind == "sklearn":
            return self._score_sklearn(texts)
        return self._score_transformers(texts)

    def _score_sklearn(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            if self.output == "probability":
                out += [float(p) for p in self.pipeline.predict_proba(chunk)[:, self.positive_index]]
            else:  # binary logistic regression: the decision function is the log-odds of classes_[1]
                sign = 1.0 if self.positive_index == 1 else -1.0
                out += [sign * float(d) for d in self.pipeline.decision_function(chunk)]
        return out

    def _score_transformers(self, texts: list[str]) -> list[float]:
        import torch

        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                logps = torch.log_softmax(self.model(**batch).logits.float(), dim=-1)
                positive = logps[:, self.positive_index]
                if self.output == "probability":
                    out += positive.exp().tolist()
                else:  # log p - log(1 - p), with log(1 - p) as the log-sum-exp of the other classes
                    others = torch.cat([logps[:, :self.positive_index], logps[:, self.positive_index + 1:]], dim=-1)
                    out += (positive - torch.logsumexp(others, dim=-1)).tolist()
        return [float(x) if math.isfinite(x) else float("nan") for x in out]

    # -- identity --------------------------------------------------------------------------------
    @property
    def accuracy(self) -> float | None:
        """The held-out accuracy recorded with the classifier (the asset's test-split reviews), if any."""
        accuracy = ((self.manifest or {}).get("built") or {}).get("accuracy") or {}
        return accuracy.get("reviews_test")

    def identity(self) -> dict[str, Any]:
        """What the scores depend on: the classifier's source and file digests, the output and input keys, and
        its recorded held-out accuracy (eval.json names the judge with this)."""
        record: dict[str, Any] = {"name": self.name, "kind": self.kind, "path": self.path, "output": self.output,
                                  "input": self.input}
        if self.source is not None:
            record["source"] = {"kind": self.source.kind, "reason": self.source.reason}
        if self.manifest is not None:
            record["files_sha256"] = self.manifest.get("files_sha256")
            record["held_out_accuracy"] = (self.manifest.get("built") or {}).get("accuracy")
        return record
