"""The generation engine: top-k/top-p on hand-made logits, greedy determinism, EOS stops, per-prompt seeds
independent of the batch, and log-probs equal to the one log-prob function's."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.logprobs import EncodedExample, encode_text, pack, sequence_logps
from alignexp.sampling.engine import (
    SamplingParams,
    _filter_logits,
    _invert_blocks,
    generate,
    long_nucleus,
    sample_next,
    stream_keys,
    stream_uniforms,
)
from alignexp.sampling.text import sample_responses, sample_seed

NEG = float("-inf")


@pytest.fixture(scope="module")
def tiny():
    """The 2-layer tiny model (conf/model/tiny.yaml) with its seeded weights, and the byte tokenizer."""
    args = ModelArgs(**OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml")))
    tokenizer = build_tokenizer(args)
    return build_model(args, tokenizer).eval(), tokenizer


def prompt_ids(tokenizer, texts):
    return [encode_text(tokenizer, t, is_prompt=True) for t in texts]


# -- filtering on hand-made logits ------------------------------------------------------------------
def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 4.0, 6.0, 7.0]])
    out = _filter_logits(logits, top_k=2, top_p=1.0)
    assert out.tolist() == [[NEG, 3.0, 2.0, NEG], [NEG, NEG, 6.0, 7.0]]
    assert torch.equal(_filter_logits(logits, top_k=0, top_p=1.0), logits)  # 0: off
    assert torch.equal(_filter_logits(logits, top_k=9, top_p=1.0), logits)  # k >= vocabulary: off


def test_top_p_keeps_the_smallest_set_reaching_p():
    """probs (0.1, 0.5, 0.15, 0.25): sorted 0.5, 0.25, 0.15, 0.1 with mass before each 0, 0.5, 0.75, 0.9.
    top_p = 0.7 keeps 0.5 and 0.25 (the mass before 0.15 already reaches 0.7); 0.3 keeps 0.5 alone."""
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    kept = torch.isfinite(_filter_logits(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [[False, True, False, True]]
    kept = torch.isfinite(_filter_logits(logits, top_k=0, top_p=0.3))
    assert kept.tolist() == [[False, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, top_k=0, top_p=0.95))
    assert kept.tolist() == [[True, True, True, True]]
    # top-k then top-p: k = 3 drops 0.1, then p = 0.6 of the kept logits' softmax (0.556, 0.278, 0.167)
    kept = torch.isfinite(_filter_logits(logits, top_k=3, top_p=0.6))
    assert kept.tolist() == [[False, True, False, True]]


def test_sampling_params_are_checked():
    for bad in ({"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# -- a scripted model: EOS stops and padding after it ---------------------------------------------------
class ScriptedLM(torch.nn.Module):
    """Row r emits token ``script[r][step]`` with near-certainty (vocabulary 8, EOS = 7)."""

    def __init__(self, script: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.step = script, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, past_key_values=None):
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], 8), -30.0)
        for row, tokens in enumerate(self.script):
            logits[row, -1, tokens[min(self.step, len(tokens) - 1)]] = 30.0
        self.step += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_eos_stops_a_row_and_max_new_tokens_caps_the_others():
    model = ScriptedLM([[1, 2, 7, 3, 3], [4, 4, 4, 4, 4]])
    out = generate(model, [[0, 1], [0]], SamplingParams(max_new_tokens=4), eos_id=7, pad_id=0, seeds=[0, 1])
    assert out[0].token_ids == [1, 2, 7] and out[0].finished  # EOS included, nothing after it
    assert out[1].token_ids == [4, 4, 4, 4] and not out[1].finished
    assert len(out[0].logprobs) == 3 and all(abs(lp) < 1e-6 for lp in out[0].logprobs)


# -- the tiny model ---------------------------------------------------------------------------------------
def test_greedy_is_deterministic_and_is_the_argmax(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, ["abcd:", "hello there:"])
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    first = generate(model, ids, params, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seeds=[1, 2])
    second = generate(model, ids, params, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seeds=[9, 8])
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    with torch.no_grad():  # the argmax, one token at a time, without cache or padding
        for prompt, generation in zip(ids, first):
            seq = list(prompt)
            for token in generation.token_ids:
                assert int(model(torch.tensor([seq])).logits[0, -1].argmax()) == token
                seq.append(token)


def test_a_prompts_sample_does_not_depend_on_its_batch(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, ["abcd:", "a much longer prompt here:", "xy:"])
    seeds = [sample_seed(3, i, 0) for i in range(3)]
    kwargs = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=10)
    together = generate(model, ids, params, seeds=seeds, **kwargs)
    alone = [generate(model, [p], params, seeds=[s], **kwargs)[0] for p, s in zip(ids, seeds)]
    reordered = generate(model, ids[::-1], params, seeds=seeds[::-1], **kwargs)[::-1]
    small_batches = generate(model, ids, params, seeds=seeds, batch_size=2, **kwargs)
    for other in (alone, reordered, small_batches):
        assert [g.token_ids for g in other] == [g.token_ids for g in together]
    assert len({tuple(g.token_ids) for g in together}) == 3
    different_seed = generate(model, ids[:1], params, seeds=[seeds[0] + 1], **kwargs)[0]
    assert different_seed.token_ids != together[0].token_ids


def test_resuming_at_a_prompt_index_reproduces_its_samples(tiny):
    """sample_responses(first_index=i) gives prompt i the streams it had in the full run (what resuming uses)."""
    model, tokenizer = tiny
    prompts = ["abcd:", "efgh:", "ijkl:"]
    params = SamplingParams(max_new_tokens=8)
    full = sample_responses(model, tokenizer, prompts, 2, params, seed=5)
    tail = sample_responses(model, tokenizer, prompts[1:], 2, params, seed=5, first_index=1)
    assert [[g.token_ids for g in row] for row in tail] == [[g.token_ids for g in row] for row in full[1:]]
    assert full[0][0].token_ids != full[0][1].token_ids  # the n samples of a prompt differ


def test_logprobs_equal_sequence_logps(tiny):
    """Per-token log-probs are those of the unmodified distribution (temperature 1, no truncation), even
    when sampling is tempered and truncated; their sum equals models.logprobs.sequence_logps."""
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, ["abcd:", "a longer prompt:", "z:"])
    for params in (SamplingParams(max_new_tokens=12), SamplingParams(temperature=0.7, top_k=20, top_p=0.9,
                                                                      max_new_tokens=12)):
        gens = generate(model, ids, params, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                        seeds=[1, 2, 3])
        batch = pack([EncodedExample(p, [g.token_ids]) for p, g in zip(ids, gens)], pad_id=tokenizer.pad_token_id)
        with torch.no_grad():
            summed = sequence_logps(model, batch)[0][:, 0]
        for g, expected in zip(gens, summed.tolist()):
            assert math.isclose(sum(g.logprobs), expected, abs_tol=1e-3)


# -- the device-side draw ---------------------------------------------------------------------------------
def test_inverse_cdf_draws_by_hand():
    """probs (0.1, 0.5, 0.15, 0.25) have the cumulative masses 0.1, 0.6, 0.75, 1.0: u = 0.05, 0.3, 0.7, 0.9
    fall in tokens 0, 1, 2, 3. With top_p = 0.7 the nucleus is tokens 1 and 3 (mass 0.75, sorted 0.5, 0.25):
    u * 0.75 = 0.375 falls in token 1, 0.6 in token 3. Each reported log-prob is the token's log p."""
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = probs.log().expand(4, 4)
    u = torch.tensor([0.05, 0.3, 0.7, 0.9])
    ids, logps = sample_next(logits, SamplingParams(), u)
    assert ids.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(logps, probs.log())
    ids, logps = sample_next(logits[:2], SamplingParams(top_p=0.7), torch.tensor([0.5, 0.8]))
    assert ids.tolist() == [1, 3]
    torch.testing.assert_close(logps, probs[[1, 3]].log())  # the unmodified distribution's, not the nucleus'
    ids, _ = sample_next(logits[:2], SamplingParams(temperature=0.0), None)
    assert ids.tolist() == [1, 1]


def test_a_draw_never_lands_on_a_token_without_mass():
    """Weights 1 (token 127, the end of block 0), 2 (token 128, the start of block 1) and 1e-6 (token 298);
    the total is 3.000001. u * total = 1e-7, 1.5, 2.997 and 3.0000008 (u at the extremes of (0, 1)) fall in
    tokens 127, 128, 128 and 298; the last token, without mass, is never drawn."""
    weights = torch.zeros(4, 300)
    weights[:, 127] = 1.0  # the last token of block 0
    weights[:, 128] = 2.0  # the first of block 1
    weights[:, 298] = 1e-6
    u = torch.tensor([2.0**-25, 0.5, 0.999, 1 - 2.0**-24])
    ids = _invert_blocks(weights, u)
    assert ids.tolist() == [127, 128, 128, 298]
    for shift in range(4):  # every row's draw is a token with mass, wherever the blocks fall
        rolled = weights.roll(shift * 37, dims=1)
        assert (rolled.gather(1, _invert_blocks(rolled, u)[:, None]) > 0).all()


def test_streams_are_counter_based_and_uniform():
    """A draw is a function of (seed, step) alone; 20,000 of them are uniform (Kolmogorov-Smirnov distance
    0.015 is the 0.1% critical value for n = 20,000), distinct, and uncorrelated between steps."""
    seeds = [sample_seed(7, i, k) for i in range(5000) for k in range(2)]
    keys = stream_keys(seeds)
    torch.testing.assert_close(stream_uniforms(keys[:3], 4), stream_uniforms(stream_keys(seeds[:3]), 4))
    torch.testing.assert_close(stream_uniforms(keys[:3], range(5))[:, 4], stream_uniforms(keys[:3], 4))  # all at once
    draws = torch.stack([stream_uniforms(keys, step) for step in range(2)])  # (2, 10000)
    flat = draws.flatten().sort().values.double()
    n = flat.numel()
    ks = torch.maximum(torch.arange(1, n + 1) / n - flat, flat - torch.arange(n) / n).max().item()
    assert ks < 0.015 and 0 < flat[0] and flat[-1] < 1
    assert flat.unique().numel() > 0.99 * n
    assert abs(torch.corrcoef(draws)[0, 1].item()) < 0.05
    # seeds that differ only above 32 bits have different streams
    assert stream_uniforms(stream_keys([5, 5 + 2**32]), 0).unique().numel() == 2


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.5), SamplingParams(top_k=3),
                                    SamplingParams(top_p=0.8), SamplingParams(temperature=1.5, top_k=5, top_p=0.6),
                                    SamplingParams(top_p=0.99)], ids=str)
def test_draws_follow_the_truncated_distribution(params):
    """20,000 draws from one row of logits (300 tokens: three blocks of the two-level search, the last one
    padded) against softmax(_filter_logits(logits / T)): every token within 5 standard errors of its
    probability, and no token outside the truncation. top_p = 0.99 needs more than the 256-token prefix."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, generator=g)
    logits[[3, 140, 299]] += torch.tensor([3.0, 2.5, 2.0])
    n = 20_000
    uniforms = stream_uniforms(stream_keys(range(n)), 0)
    ids, _ = sample_next(logits.expand(n, 300), params, uniforms)
    counts = torch.bincount(ids, minlength=300).double()
    filtered = _filter_logits(logits[None] / params.temperature, params.top_k, params.top_p)[0]
    expected = torch.softmax(filtered.double(), dim=-1)
    assert counts[expected == 0].sum() == 0
    stderr = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 5 * stderr + 1e-12).all()


def test_long_nucleus_is_the_top_p_set():
    """The nucleus found by bisection, without sorting, is exactly the set _filter_logits keeps: flat rows
    (a long nucleus), peaked rows, and a row of ties (sorted instead)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 3000, generator=g)
    logits[:3, :2] += 8.0  # peaked
    logits[3] *= 0.05  # nearly flat
    logits[4] = 0.0  # all tied: more ties than the bisection leaves to sort
    for top_p in (0.5, 0.9, 0.99):
        kept = long_nucleus(torch.softmax(logits, -1), top_p)
        expected = torch.isfinite(_filter_logits(logits, 0, top_p))
        assert torch.equal(kept[:4] > 0, expected[:4]) and torch.equal(kept[5:] > 0, expected[5:])
        assert (kept[4] > 0).sum() == expected[4].sum()  # which of equal tokens is first is arbitrary
        torch.testing.assert_close(kept[kept > 0], torch.softmax(logits, -1)[kept > 0])


def test_prefill_runs_the_head_on_the_last_position_only(tiny):
    """transformers' ``logits_to_keep=1``: the prompt's other positions never go through the output head."""
    model, tokenizer = tiny
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        generate(model, prompt_ids(tokenizer, ["a longer prompt:", "z:"]), SamplingParams(max_new_tokens=2),
                 eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, seeds=[0, 1])
    finally:
        handle.remove()
    assert [s[:2] for s in shapes] == [(2, 1), (2, 1)]


def test_bad_generate_input_is_named(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="one seed per prompt, got 1 seeds for 2 prompts"):
        generate(model, [[1], [2]], SamplingParams(), eos_id=0, pad_id=0, seeds=[0])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], SamplingParams(), eos_id=0, pad_id=0, seeds=[0, 1])
