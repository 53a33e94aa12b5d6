"""Progress on long stages (:func:`alignexp.distributed.shard_map`'s bar): prompts done of the total, rate,
ETA and tokens per second on a terminal; nothing where the output is not one; the results unchanged."""

from __future__ import annotations

import io

import tqdm.auto

from alignexp.distributed import shard_map


def test_a_terminal_sees_prompts_rate_eta_and_tokens_per_second(monkeypatch):
    stream = io.StringIO()
    original = tqdm.auto.tqdm

    class OnATerminal(original):  # what a terminal would show: the bar enabled, written to our stream
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": stream, "mininterval": 0})

    monkeypatch.setattr(tqdm.auto, "tqdm", OnATerminal)
    results = shard_map(lambda i: [i] * 3, 4, "sampling 4 per prompt", items=[5, 5, 5, 2], unit="prompt",
                        tokens=lambda result: 10 * len(result))
    assert results == [[0] * 3, [1] * 3, [2] * 3, [3] * 3]
    shown = stream.getvalue().replace("\r", "\n")
    assert "sampling 4 per prompt" in shown and "15/17" in shown and "prompt/s" in shown and "tokens/s" in shown
    assert "<" in shown  # elapsed<remaining: the ETA


def test_no_bar_where_the_output_is_not_a_terminal(capsys):
    assert shard_map(lambda i: i, 3, "sampling", items=[1, 1, 1], unit="prompt") == [0, 1, 2]
    captured = capsys.readouterr()
    assert "sampling" not in captured.err and "sampling" not in captured.out
