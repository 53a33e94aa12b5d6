"""DDP on 2 CPU processes (gloo), launched once before the first stage: the default experiment runs with
every file written once, and 2 ranks at half the per-device batch end where 1 process does."""

from __future__ import annotations

import json
import re

import torch

from tests.distributed.conftest import FAST, TWO_CPU_RANKS, check, only_file, train, weights


def one_process_run(tmp_path, *overrides: str) -> dict:
    """The same experiment in this process (one rank), through the composed config and ``alignexp.train.run``."""
    from hydra import compose, initialize_config_dir

    from alignexp.config import CONF_DIR
    from alignexp.train import run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"paths.output_dir={tmp_path / 'one'}", *overrides])
    return run(cfg)


def test_two_ddp_ranks_run_the_default_experiment_once_and_match_one_process_at_twice_the_batch(tmp_path):
    """``hardware=ddp hardware.accelerator=cpu hardware.devices=2`` on the default experiment (debug=fast), as a
    one-job sweep: one policy folder, one eval.json, one printed table, one jobs.jsonl line. In float64, 2 ranks
    at ``train.batch_size=8`` end with the weights of 1 process at 16 (to 1e-6); the sharded sampling writes
    exactly the rankings 1 process writes; the reference log-probs agree to float32 rounding (their forward
    runs in batches of the per-device batch size, 8 here and 16 there; at equal batch sizes the sharded
    forward is exact, :func:`test_sharded_sampling_and_log_probs_are_the_one_process_ones`)."""
    sweep, two_cache, one_cache = tmp_path / "sweep", tmp_path / "cache2", tmp_path / "cache1"
    result = check(train("-m", "seed=0", *FAST, "hardware=ddp", *TWO_CPU_RANKS, "hardware.precision=64-true",
                         "train.batch_size=8", f"hydra.sweep.dir={sweep}", cache=two_cache))
    jobs = [json.loads(line) for line in (sweep / "jobs.jsonl").read_text().splitlines()]
    assert [(j["num"], j["status"]) for j in jobs] == [(0, "COMPLETED")]
    assert [p.relative_to(sweep).as_posix() for p in sweep.rglob("policy")] == ["0/policy"]
    assert [p.relative_to(sweep).as_posix() for p in sweep.rglob("eval.json")] == ["0/eval.json"]
    assert [p.relative_to(sweep).as_posix() for p in sweep.rglob(".hydra")] == ["0/.hydra"]
    assert result.stdout.count("KL to reference") == 1  # the table, printed by rank 0 alone
    # one voice: no log line twice (rank 1 logs warnings only, from its first check on)
    messages = [re.sub(r"^\[[\d\- :,]+\]", "", line) for line in (result.stdout + result.stderr).splitlines()
                if line.startswith(("[20", "[alignexp]"))]
    assert len(messages) > 10 and not [m for m in set(messages) if messages.count(m) > 1]
    assert "train: global batch 16 = 8 per device x 2 process(es)" in result.stdout
    two = json.loads((sweep / "0" / "eval.json").read_text())
    assert two["global_batch_size"] == 16

    sft = only_file(two_cache / "sft", "config.json").parent  # trained by both ranks, written once
    one = one_process_run(tmp_path, "loss=ranked_dpo", *FAST, "hardware=cpu", "hardware.precision=64-true",
                          "train.batch_size=16", f"init_from={sft}", f"paths.cache_dir={one_cache}")
    assert one["global_batch_size"] == 16 and one["init_from"] == two["init_from"] == str(sft)

    for kind in ("preferences", "reference"):  # the same cache keys (same SFT policy and data), same contents
        names = sorted(p.name for p in (two_cache / kind).iterdir() if not p.name.startswith("."))
        assert names == sorted(p.name for p in (one_cache / kind).iterdir() if not p.name.startswith(".")) != []
    for name in (p.name for p in (one_cache / "preferences").glob("*.jsonl")):
        assert (two_cache / "preferences" / name).read_bytes() == (one_cache / "preferences" / name).read_bytes()
    for name in (p.name for p in (one_cache / "reference").glob("*.pt")):
        rows_two, rows_one = (torch.load(cache / "reference" / name) for cache in (two_cache, one_cache))
        assert len(rows_two) == len(rows_one) > 0
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(rows_two, rows_one))

    two_weights, one_weights = weights(sweep / "0" / "policy"), weights(tmp_path / "one" / "policy")
    start = weights(sft)
    assert set(two_weights) == set(one_weights) and all(v.dtype == torch.float64 for v in two_weights.values())
    assert max((two_weights[k] - one_weights[k]).abs().max().item() for k in one_weights) < 1e-6
    assert max((one_weights[k] - start[k].double()).abs().max().item() for k in one_weights) > 1e-5  # it trained


def _sharded_rank(rank: int, folder: str) -> None:
    """One of 2 gloo ranks: sample and score with the sharded helpers; rank 0 saves what it gathered."""
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        samples, rows = _sample_and_score()
        if rank == 0:
            torch.save({"samples": samples, "rows": rows}, f"{folder}/two.pt")
    finally:
        dist.destroy_process_group()


def _sample_and_score():
    from alignexp.models.backbone import ModelArgs, build_model
    from alignexp.models.logprobs import EncodedExample
    from alignexp.models.reference import response_logps
    from alignexp.models.tokenizer import build_byte_tokenizer
    from alignexp.sampling.engine import SamplingParams
    from alignexp.sampling.samplers import draw

    tokenizer = build_byte_tokenizer()
    model = build_model(ModelArgs(arch={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}),
                        tokenizer)
    prompts = [f"prompt {i} " * (1 + i % 3) for i in range(11)]
    samples = draw(model, tokenizer, prompts, 4, SamplingParams(max_new_tokens=6), seed=3, max_prompt_len=32,
                   batch_size=8)
    encoded = [EncodedExample(list(range(5, 9 + i % 4)), [list(s.token_ids) or [1] for s in row])
               for i, row in enumerate(samples)]
    rows = response_logps(model, encoded, tokenizer.pad_token_id, batch_size=3)
    return [[list(s.token_ids) for s in row] for row in samples], rows


def test_sharded_sampling_and_log_probs_are_the_one_process_ones(tmp_path):
    """2 gloo ranks: :func:`alignexp.sampling.samplers.draw` (prompts in chunks of batch_size // n) and
    :func:`alignexp.models.reference.response_logps` (batches) give, gathered, exactly the one-process
    samples and log-probs (the same batches, computed on different ranks)."""
    import os
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("", 0))
        os.environ["TEST_PORT"] = str(sock.getsockname()[1])
    mp.spawn(_sharded_rank, args=(str(tmp_path),), nprocs=2)
    two = torch.load(tmp_path / "two.pt")
    samples, rows = _sample_and_score()
    assert two["samples"] == samples and len(samples) == 11
    assert len(two["rows"]) == len(rows) == 11 and all(torch.equal(a, b) for a, b in zip(two["rows"], rows))
