"""Reward models: a scalar head on the backbone, scored over packed [prompt | response] sequences.

A reward model is a Hugging Face ``AutoModelForSequenceClassification`` with ``num_labels = 1``,
built from the same config as the policy (``model.arch``) or loaded from a causal-LM folder (the SFT
policy, as in Ouyang et al. 2022 and the DPO paper), and saved in HF format, so that
``AutoModelForSequenceClassification.from_pretrained(folder)`` reads it.

**Scores** reuse the shared-prefix packing of :mod:`alignexp.models.logprobs` (no second
tokenisation path): one forward over the packed rows, and the head on the hidden state of each
response's **last token** (its EOS, where it was not truncated away), the position Hugging Face's
own sequence-classification forward pools for a ``[prompt | response]`` row without padding.

**Normalisation.** After training the rewards are shifted to mean 0 over the training prompts'
responses; the shift is stored in the model's config as ``reward_offset`` (Llama's score head has no
bias to absorb it) and :func:`sequence_scores` subtracts it. A plain ``from_pretrained`` forward
returns the raw head output: subtract ``model.config.reward_offset`` yourself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignexp.judges.base import ScoreJudge, ranked_example
from alignexp.models.backbone import (
    DTYPES,
    ModelArgs,
    ModelUnavailable,
    _from_pretrained,
    attention_implementation,
    build_model,
    build_tokenizer,
    causal_lm_class,
    route_block_masks_to_sdpa,
)
from alignexp.models.batched import map_batches
from alignexp.models.logprobs import EncodedExample, PackedBatch, encode_example, padded_masks
from alignexp.tasks.base import RankedExample, Text

OFFSET_KEY = "reward_offset"


def build_reward_model(args: ModelArgs, tokenizer, device_type: str = "cpu"):
    """A sequence-classification model with one output.

    With ``args.path`` None: the causal LM :func:`alignexp.models.backbone.build_model` builds from
    ``args.arch`` (same config, same seeded weights), its backbone under a score head seeded by
    ``args.init_seed``. Otherwise the folder or hub id ``args.path``: a causal LM's folder (the SFT
    policy) gets a new, seeded score head; a reward model's folder is read as it is.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    dtype = DTYPES[args.dtype]
    plain = ModelArgs(**{**args.__dict__, "gradient_checkpointing": False})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.init_seed)
        if args.path is None:
            causal = build_model(plain, tokenizer, device_type)  # its attention chosen for its architecture
            config = copy.deepcopy(causal.config)
            config.num_labels = 1
            attn = config._attn_implementation
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, attn_implementation=attn)
            model.base_model.load_state_dict(causal.base_model.state_dict())
        else:  # the attention the architecture supports (``auto``: eager for Gemma-2's soft-capping), as build_model
            config = _from_pretrained(AutoConfig.from_pretrained, args.path, "reward model config")
            attn = attention_implementation(args.attn_implementation, device_type, causal_lm_class(config))
            if attn == "flash_attention_2":
                route_block_masks_to_sdpa(attn)
            model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, args.path, "reward model",
                                     num_labels=1, dtype=dtype, attn_implementation=attn)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:  # as build_model does: non-reentrant
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


def _score_head(model) -> torch.nn.Module:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no 'score' or 'classifier' head: not a sequence-classification model")
    return head


def response_end_index(batch: PackedBatch) -> Tensor:
    """(B, n) long: the flat index into the packed rows (R*T) of each response's last token (0 where masked).

    Within an example's block ``[prompt | r_0 | r_1 | ...]`` (empty slots take no room; blocks may share a
    row) response k ends at ``q + sum_{j <= k} len_j``, where q, the flat index of the prompt's last token,
    is the source index of every response's first token, read off ``batch.source_index``.
    """
    b, n = batch.lengths.shape
    slot, source = batch.slot, batch.source_index
    if slot.numel() == 0:
        return torch.zeros((b, n), dtype=torch.long, device=batch.lengths.device)
    first = torch.ones_like(slot, dtype=torch.bool)
    first[1:] = slot[1:] != slot[:-1]  # the first token of each response
    prompt_last = torch.zeros(b * n, dtype=torch.long, device=slot.device)
    prompt_last[slot[first]] = source[first]
    ends = prompt_last.view(b, n) + batch.lengths.cumsum(dim=1)
    return torch.where(batch.mask, ends, torch.zeros_like(ends))


def sequence_scores(model, batch: PackedBatch) -> Tensor:
    """Rewards r(x, y) (B, n) of a packed batch: the head on each response's last hidden state, minus
    ``config.reward_offset`` (0 until the model is normalised). Masked slots hold 0. One forward, as in
    :func:`alignexp.models.logprobs.sequence_logps`."""
    decoder = model.base_model
    hidden = decoder(input_ids=batch.input_ids, attention_mask=padded_masks(decoder, batch, model.dtype),
                     position_ids=batch.position_ids, use_cache=False).last_hidden_state
    ends = response_end_index(batch)
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, ends.view(-1))
    scores = _score_head(model)(states).float().view(ends.shape) - float(getattr(model.config, OFFSET_KEY, 0.0))
    return torch.where(batch.mask, scores, torch.zeros_like(scores))


def score_encoded(model, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int = 32) -> list[Tensor]:
    """Each example's rewards (n,) on the CPU, in batches of ``batch_size`` examples, without gradients."""
    return map_batches(model, encoded, pad_id, batch_size, sequence_scores)


def load_reward_model(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """A saved reward model and its tokenizer (``reward_offset`` read from its config)."""
    args = ModelArgs(name="reward_model", path=str(path), dtype=dtype)
    tokenizer = build_tokenizer(args)
    model = build_reward_model(args, tokenizer, device_type=torch.device(device).type)
    if getattr(model.config, "num_labels", 1) != 1:
        raise ValueError(f"{path}: a reward model has one output (num_labels=1), this one has {model.config.num_labels}")
    return model.to(device).eval(), tokenizer


class RewardModelJudge(ScoreJudge):
    """A trained reward model as a judge: ``score`` is r(x, y), ``compare`` compares scores."""

    name = "reward_model"

    def __init__(self, path: str | Path | None = None, *, model=None, tokenizer=None, device: str = "cpu",
                 batch_size: int = 32, max_prompt_len: int = 512, max_response_len: int = 256,
                 offload: bool = False, **_: Any):
        if model is None:
            if path is None:
                raise ValueError("judge.path: the reward_model judge needs the folder of a trained reward model "
                                 "(<run>/reward_model)")
            try:
                model, tokenizer = load_reward_model(path, "cpu" if offload else device)
            except ModelUnavailable as error:
                raise ModelUnavailable(f"judge.path={path}: the reward model cannot be loaded ({error})") from None
        if tokenizer is None:
            raise ValueError("RewardModelJudge(model=...) needs its tokenizer too")
        self.model, self.tokenizer, self.device, self.offload = model, tokenizer, device, offload
        self.batch_size, self.max_prompt_len, self.max_response_len = batch_size, max_prompt_len, max_response_len

    @contextmanager
    def _on_device(self) -> Iterator[None]:
        """With ``offload``, the model waits on the CPU and visits ``device`` only while it scores."""
        if not self.offload:
            yield
            return
        self.model.to(self.device)
        try:
            yield
        finally:
            self.model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _encode(self, prompt: Text, responses: Sequence[Text]) -> EncodedExample:
        return encode_example(self.tokenizer, RankedExample(prompt, list(responses)), self.max_prompt_len,
                              self.max_response_len)

    def score(self, prompts: Sequence[Text], responses: Sequence[Text]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        encoded = [self._encode(p, [r]) for p, r in zip(prompts, responses)]
        with self._on_device():
            rows = score_encoded(self.model, encoded, self.tokenizer.pad_token_id, self.batch_size)
        return [float(row[0]) for row in rows]

    def rank_all(self, prompts: Sequence[Text], candidates: Sequence[Sequence[Text]],
                 metas: Sequence[dict[str, Any]] | None = None) -> list[RankedExample]:
        """Each prompt's candidates scored in one packed row (the prompt computed once)."""
        encoded = [self._encode(p, rs) for p, rs in zip(prompts, candidates)]
        with self._on_device():
            rows = score_encoded(self.model, encoded, self.tokenizer.pad_token_id, self.batch_size)
        return [ranked_example(p, rs, row.tolist(), self.name, metas[i] if metas else None)
                for i, (p, rs, row) in enumerate(zip(prompts, candidates, rows))]

