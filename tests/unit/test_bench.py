"""The generation benchmark's machinery on the tiny model with a few tokens (the figures themselves come from
``python -m alignexp.bench``): both sides produce their rows, and the decode step is what the definition says."""

from __future__ import annotations

import argparse

import pytest

from alignexp.bench import generation


def test_generation_rows_on_the_tiny_model():
    parser = argparse.ArgumentParser()
    generation.add_arguments(parser)
    args = parser.parse_args(["--gen-batch", "4", "--gen-new-tokens", "3", "--gen-runs", "1"])
    result = generation.run_setting(generation.Setting("tiny"), args)
    for side in ("engine", "generate"):
        r = result[side]
        assert r["decode_step_s"] == pytest.approx((r["median_s"] - r["one_token_s"]) / 2)
        assert r["sampling_s"] > 0 and r["sampling_share"] == pytest.approx(r["sampling_s"] / r["decode_step_s"])
    assert result["ratio"] == pytest.approx(result["engine"]["median_s"] / result["generate"]["median_s"])
