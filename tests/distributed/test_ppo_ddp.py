"""PPO on 2 CPU processes (gloo): each rank samples and scores its half of an iteration's prompts, the rollouts are
gathered so that rewards, GAE, the whitening of the advantages and the KL controller see all of them, and a run on
2 processes (half the prompts each) ends where the 1-process run ends."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.distributed.conftest import FAST, TWO_CPU_RANKS, check, only_file, train, weights
from tests.distributed.test_ddp import one_process_run

ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False}
PROMPTS = [f"prompt {i} " * (1 + i % 3) for i in range(11)]


class CountingJudge:
    """A reward that depends on the text (its length and its letters), counting the responses it scores."""

    name = "counting"

    def __init__(self):
        self.scored = 0

    def score(self, prompts, responses) -> list[float]:
        self.scored += len(responses)
        return [0.1 * len(r) - 0.01 * sum(map(ord, r[:3])) for r in responses]


def _rollout(iteration: int = 4) -> tuple[dict, int]:
    """Iteration ``iteration``'s rollout of 10 of :data:`PROMPTS` (in a shuffled order) by a tiny policy against
    another reference (float64 weights; the log-probs are fp32), and how many responses this process's judge scored."""
    from alignexp.args import PPOArgs
    from alignexp.lightning_modules.ppo import PPOModule
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.tokenizer import build_byte_tokenizer

    torch.set_num_threads(1)
    tokenizer = build_byte_tokenizer()
    policy = build_model(ModelArgs(arch=ARCH), tokenizer).double()
    reference = build_model(ModelArgs(arch={**ARCH, "initializer_range": 0.05}, init_seed=1), tokenizer).double()
    judge = CountingJudge()
    module = PPOModule(policy, reference, tokenizer, PROMPTS, judge,
                       PPOArgs(rollout_batch_size=10, max_new_tokens=7, temperature=0.8), seed=5)
    module.value_head.double()
    with torch.no_grad():
        module.value_head.linear.weight.normal_(generator=torch.Generator().manual_seed(0))
    rollout, metrics = module.rollout(iteration, [7, 2, 9, 0, 4, 1, 10, 3, 8, 6])
    fields = {name: getattr(rollout, name) for name in ("mask", "logprobs", "values", "advantages", "returns")}
    return {"encoded": [(e.prompt_ids, e.response_ids) for e in rollout.encoded], "metrics": metrics,
            **fields}, judge.scored


def _rollout_rank(rank: int, folder: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rollout, scored = _rollout()
        torch.save({"rollout": rollout, "scored": scored}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_sample_half_the_prompts_each_and_gather_the_one_process_rollout(tmp_path):
    """2 gloo ranks: each samples and scores 5 of the iteration's 10 prompts; on both ranks the gathered rollout
    (responses, per-token log-probs, values) is the 1-process one, and so are what is computed over all the
    rollouts: the advantages whitened with the global mean and variance, the returns, the KL and the other
    metrics the controller and the logs read."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("", 0))
        os.environ["TEST_PORT"] = str(sock.getsockname()[1])
    mp.spawn(_rollout_rank, args=(str(tmp_path),), nprocs=2)
    one, scored = _rollout()
    assert scored == 10
    whitened = one["advantages"][one["mask"]]
    assert abs(float(whitened.mean())) < 1e-5 and abs(float(whitened.var(unbiased=False)) - 1) < 1e-4
    for rank in (0, 1):
        two = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert two["scored"] == 5  # half the prompts each: the judge saw only this rank's responses
        assert two["rollout"]["encoded"] == one["encoded"] and len(one["encoded"]) == 10
        assert torch.equal(two["rollout"]["mask"], one["mask"])
        for name in ("logprobs", "values", "advantages", "returns"):
            torch.testing.assert_close(two["rollout"][name], one[name], rtol=0, atol=1e-6)  # fp32 log-probs
        assert two["rollout"]["metrics"] == pytest.approx(one["metrics"], rel=1e-6, abs=1e-6, nan_ok=True)
    # half the rollouts whitened on their own would not be whitened over all of them
    half = one["mask"][:5]
    assert abs(float(one["advantages"][:5][half].mean())) > 1e-3


@pytest.mark.slow
def test_ppo_on_two_ddp_ranks_equals_one_process(tmp_path):
    """``loss=ppo`` end to end (debug=fast: 2 iterations of 8 prompts, 2 minibatches) under
    ``hardware=ddp`` on 2 CPU processes in float64, each sampling 4 prompts per iteration and computing
    half of each minibatch, against 1 process from the same SFT policy: the same history (score, KL,
    losses, clip fractions, KL coefficient) and the same trained policy and value head, and it trained.
    The tolerance is 1e-6: the per-token log-probs are fp32 (``token_logps``) whatever the weights'
    dtype, and the ranks' forwards pack other examples together than the one process's."""
    two_out, two_cache, one_cache = tmp_path / "two", tmp_path / "cache2", tmp_path / "cache1"
    result = check(train("loss=ppo", *FAST, "hardware=ddp", *TWO_CPU_RANKS, "hardware.precision=64-true",
                         f"hydra.run.dir={two_out}", cache=two_cache))
    assert "ppo: 8 prompts per iteration = 4 per process x 2 process(es)" in result.stdout
    sft = only_file(two_cache / "sft", "config.json").parent
    one_process_run(tmp_path, "loss=ppo", *FAST, "hardware=cpu", "hardware.precision=64-true", f"init_from={sft}",
                    f"paths.cache_dir={one_cache}")
    one_out = tmp_path / "one"
    two_state, one_state = (torch.load(out / "checkpoints" / "ppo-last.pt", weights_only=False)
                            for out in (two_out, one_out))
    assert [h["iteration"] for h in two_state["history"]] == [0.0, 1.0]
    metric_diff = 0.0
    for two, one in zip(two_state["history"], one_state["history"]):
        assert two.keys() == one.keys()
        assert two == pytest.approx(one, rel=1e-6, abs=1e-6, nan_ok=True)
        metric_diff = max([metric_diff] + [abs(two[k] - one[k]) for k in one if one[k] == one[k]])
    print(f"ppo 2 ranks vs 1 process: history max abs diff {metric_diff:.3g}")
    assert one_state["history"][1]["kl"] != 0.0
    two_weights, one_weights = weights(two_out / "policy"), weights(one_out / "policy")
    diff = max((two_weights[k] - one_weights[k]).abs().max().item() for k in one_weights)
    print(f"ppo 2 ranks vs 1 process: policy max abs diff {diff:.3g}")
    assert set(two_weights) == set(one_weights) and diff < 1e-6
    start = weights(sft)
    assert max((one_weights[k] - start[k].double()).abs().max().item() for k in one_weights) > 1e-5  # it trained
    head = max((two_state["value_head"][k] - one_state["value_head"][k]).abs().max().item()
               for k in one_state["value_head"])
    print(f"ppo 2 ranks vs 1 process: value head max abs diff {head:.3g}")
    assert head < 1e-6
