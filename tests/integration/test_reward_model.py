"""The reward model: its loss by hand, packed scoring equal to Hugging Face's own forward, and a tiny reward
model trained on synthetic rankings that orders held-out rankings well above chance, normalised,
saved and read back in HF format."""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR
from alignexp.judges import build_judge
from alignexp.judges.reward_model import (
    build_reward_model,
    response_end_index,
    score_encoded,
    sequence_scores,
)
from alignexp.lightning_modules.datamodule import RankingDataset, encode_all, make_loader
from alignexp.lightning_modules.preference import OptimArgs
from alignexp.lightning_modules.reward import (
    RewardModule,
    normalise_rewards,
    ranking_labels,
    save_reward_model,
    split_heldout,
)
from alignexp.losses import get_loss
from alignexp.metrics.preference import ranking_accuracy
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.logprobs import EncodedExample, pack
from alignexp.tasks.base import RankedExample
from alignexp.tasks.synthetic import SyntheticTask


@pytest.fixture(scope="module")
def tiny_args() -> ModelArgs:
    return ModelArgs(**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml")))


# -- the loss, by hand ------------------------------------------------------------------------------------
def test_reward_loss_bradley_terry_and_plackett_luce():
    """BT: r = (2, 0) -> log(1 + e^-2) = 0.12693. PL: r = (1, 0, -1) -> log(1 + e^-1 + e^-2) + log(1 + e^-1)
    = 0.40761 + 0.31326 = 0.72087. A masked third slot leaves the pair (1, 0): log(1 + e^-1) = 0.31326."""
    spec = get_loss("reward")
    assert not spec.needs_reference and spec.listwise
    assert math.isclose(spec(torch.tensor([[2.0, 0.0]])).loss.item(), 0.12693, abs_tol=1e-5)
    assert math.isclose(spec(torch.tensor([[1.0, 0.0, -1.0]])).loss.item(), 0.72087, abs_tol=1e-5)
    masked = spec(torch.tensor([[1.0, 0.0, float("nan")]]), mask=torch.tensor([[True, True, False]]))
    assert math.isclose(masked.loss.item(), 0.31326, abs_tol=1e-5)


def test_reward_loss_margin_and_pairs_equal_minus_logsigmoid():
    r = torch.randn(6, 2, requires_grad=True)
    out = get_loss("reward")(r, margin=0.5)
    expected = -F.logsigmoid(r[:, 0] - r[:, 1] - 0.5).mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert torch.isfinite(r.grad).all()
    assert set(out.metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}


def test_reward_loss_rows_without_a_pair_are_left_out():
    r = torch.tensor([[3.0, 1.0], [5.0, 0.0]])
    out = get_loss("reward")(r, mask=torch.tensor([[True, True], [True, False]]))
    assert math.isclose(out.loss.item(), math.log1p(math.exp(-2.0)), abs_tol=1e-6)


# -- packed scores equal Hugging Face's forward on each [prompt | response] alone ----------------------------
def test_sequence_scores_equal_the_hf_forward(tiny_args):
    tokenizer = build_tokenizer(tiny_args)
    model = build_reward_model(tiny_args, tokenizer).eval()
    eos = tokenizer.eos_token_id
    examples = [EncodedExample([257, 10, 11, 12], [[20, 21, eos], [22, eos], [23, 24, 25, 26, eos]]),
                EncodedExample([257, 13], [[eos], [30, 31, eos]]),  # a one-token response, and one slot masked
                EncodedExample([257, 14, 15, 16, 17, 18], [[40, eos], [41, 42, eos], [eos]])]
    batch = pack(examples, pad_id=tokenizer.pad_token_id)
    ends = response_end_index(batch)
    flat = batch.input_ids.view(-1)
    for b, ex in enumerate(examples):  # each end index is the last token of the response (its EOS)
        for k, response in enumerate(ex.response_ids):
            end = int(ends[b, k])
            assert flat[end - len(response) + 1:end + 1].tolist() == response
    with torch.no_grad():
        packed = sequence_scores(model, batch)
        for b, ex in enumerate(examples):
            for k, response in enumerate(ex.response_ids):
                alone = model(input_ids=torch.tensor([ex.prompt_ids + response])).logits[0, 0]
                assert torch.allclose(packed[b, k], alone, atol=1e-4)
    assert packed[1, 2] == 0 and not batch.mask[1, 2]


def test_reward_model_from_a_causal_lm_folder(tiny_args, tmp_path):
    """The SFT policy's folder gives the backbone; the new score head is seeded (two loads agree)."""
    tokenizer = build_tokenizer(tiny_args)
    policy = build_model(tiny_args, tokenizer)
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    args = ModelArgs(**{**tiny_args.__dict__, "path": str(tmp_path / "policy")})
    first, second = build_reward_model(args, tokenizer), build_reward_model(args, tokenizer)
    assert torch.equal(first.score.weight, second.score.weight)
    assert torch.equal(first.model.embed_tokens.weight, policy.model.embed_tokens.weight)
    assert first.config.num_labels == 1


# -- training -----------------------------------------------------------------------------------------------
def synthetic_rankings(n_prompts: int, n: int = 4):
    """Rankings of n demonstrations of the synthetic language per prompt, by a Plackett-Luce draw on the gold
    reward (the task's own labelling, tau = 0.05; the exact rewards in meta["gold_rewards"])."""
    task = SyntheticTask(n_sft=n_prompts * n, n_train_prompts=n_prompts)
    demos = [ex.responses[0] for ex in task.sft_examples("train")]
    rng = random.Random(0)
    return [task.rank(p, demos[n * i:n * (i + 1)], rng, index=i) for i, p in enumerate(task.prompts("train"))]


def test_reward_model_learns_the_gold_ranking(tiny_args, tmp_path):
    """~10 s: 128 training rankings of 4, 3 epochs; held-out ranking accuracy (pairs, chance 0.5) > 0.65."""
    tokenizer = build_tokenizer(tiny_args)
    train, heldout = split_heldout(synthetic_rankings(160), 0.2, seed=0)
    assert (len(train), len(heldout)) == (128, 32)

    def encode(examples):
        return encode_all(tokenizer, examples, 64, 32)

    model = build_reward_model(tiny_args, tokenizer)
    loader = make_loader(RankingDataset(encode(train)), 16, tokenizer.pad_token_id, shuffle=True, seed=0)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(RewardModule(model, {"margin": 0.0}, OptimArgs(lr=2e-3, warmup_steps=5)), loader)

    rows = [r.tolist() for r in score_encoded(model, encode(heldout), tokenizer.pad_token_id)]
    accuracy = ranking_accuracy(rows, [ranking_labels(ex) for ex in heldout], prefix="acc")
    gold = ranking_accuracy(rows, [ranking_labels(ex, "gold_rewards") for ex in heldout], prefix="acc")
    print(f"held-out pair accuracy {accuracy['acc']:.3f} ± {accuracy['acc_stderr']:.3f} (labels), "
          f"{gold['acc']:.3f} ± {gold['acc_stderr']:.3f} (exact gold order)")
    assert accuracy["acc"] > 0.65 and gold["acc"] > 0.65

    offset = normalise_rewards(model, encode(train), tokenizer.pad_token_id)
    train_scores = torch.cat(score_encoded(model, encode(train), tokenizer.pad_token_id))
    assert abs(train_scores.mean().item()) < 1e-4 and model.config.reward_offset == offset

    folder = save_reward_model(model, tokenizer, tmp_path / "reward_model")
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert reloaded.config.reward_offset == pytest.approx(offset)
    judge = build_judge({"_target_": "alignexp.judges.reward_model.RewardModelJudge", "name": "reward_model",
                         "path": str(folder), "max_prompt_len": 64, "max_response_len": 32}, SyntheticTask())
    ex = heldout[0]
    scores = judge.score([ex.prompt] * ex.n, ex.responses)
    with torch.no_grad():
        for response, score in zip(ex.responses, scores):
            ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
            row = [tokenizer.bos_token_id, *ids, *tokenizer(response, add_special_tokens=False)["input_ids"],
                   tokenizer.eos_token_id]
            raw = reloaded(input_ids=torch.tensor([row])).logits[0, 0].item()
            assert math.isclose(score, raw - reloaded.config.reward_offset, abs_tol=1e-4)
    ranked = judge.rank(ex.prompt, ex.responses)
    assert ranked.scores == pytest.approx(sorted(scores, reverse=True), abs=1e-4)
    assert judge.compare([ex.prompt], [ranked.responses[0]], [ranked.responses[-1]]) in ([1.0], [0.5])


def test_saved_reward_model_scores_at_the_eos_in_plain_transformers(tmp_path):
    """A tokenizer that had no pad token gets pad = EOS (as Llama's and Mistral's do in alignexp); the saved
    reward model still scores, in plain transformers (one row, or right-padded batches), what alignexp
    scores once config.reward_offset is subtracted: it pools at the EOS, not at the token before it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignexp.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # a tokenizer without its own pad token, as build_tokenizer treats one
    fields = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml"))
    model = build_reward_model(ModelArgs(**fields), tokenizer)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.config.reward_offset = 0.25
    examples = [RankedExample("abc:", ["dd", "efgh", "i"]), RankedExample("jk:", ["lmnop", "q"])]
    encoded = encode_all(tokenizer, examples, 64, 32)
    ours = [row.tolist() for row in score_encoded(model, encoded, tokenizer.pad_token_id)]
    folder = save_reward_model(model, tokenizer, tmp_path / "reward_model")

    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(folder)
    assert saved_tokenizer.pad_token_id != saved_tokenizer.eos_token_id == tokenizer.eos_token_id
    rows = [[saved_tokenizer.bos_token_id, *e.prompt_ids[1:], *r] for e in encoded for r in e.response_ids]
    expected = [s for row in ours for s in row]
    with torch.no_grad():
        one_by_one = [plain(input_ids=torch.tensor([row])).logits[0, 0].item() for row in rows]
        width = max(map(len, rows))
        padded = torch.tensor([row + [saved_tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        batch = plain(input_ids=padded, attention_mask=(padded != saved_tokenizer.pad_token_id).long()).logits[:, 0]
    offset = plain.config.reward_offset
    assert [v - offset for v in one_by_one] == pytest.approx(expected, abs=1e-4)
    assert [v - offset for v in batch.tolist()] == pytest.approx(expected, abs=1e-4)
