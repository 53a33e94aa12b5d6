"""The generation benchmark's machinery on the tiny model with a few tokens (the figures themselves come from
``python -m alignexp.bench``): both sides produce their rows, and the decode step is what the definition says."""

from __future__ import annotations

import argparse

import pytest
import torch

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


# --------------------------------------------------------------------------- the real-model rows


def _real_like_folder(folder):
    """A 2-layer random Llama saved with a byte-level BPE tokenizer trained here (SmolLM2's conventions: BOS
    ``<|im_start|>``, EOS = pad = ``<|im_end|>``, no special tokens added by the tokenizer itself)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from alignexp.bench.preference import WORDS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([" ".join(WORDS)] * 20 + ["Rate it: good. Rate it: bad."] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def test_real_model_path_feeds_both_sides_the_same_token_ids(tmp_path):
    """On a folder with a real-BPE-like tokenizer, TRL's side is handed alignexp's token ids (prompt and response
    tokenised apart: BOS + prompt, response + EOS) and its collator builds exactly those sequences, although TRL's
    own tokenisation of the text (prompt + completion together, cut at the common prefix) changes the pair whose
    prompt ends in a space; the two sides' reference log-probs then agree."""
    pytest.importorskip("trl")
    from alignexp.bench.preference import (
        AlignexpSide,
        Shape,
        SideSpec,
        TrlSide,
        build_side_model,
        make_word_texts,
    )

    _real_like_folder(tmp_path)
    shape = Shape("test", 2, 3, (6, 12), (3, 8), None, "ranked_dpo", None, "test", None, "real")
    spec = SideSpec("x", "alignexp", model_path=str(tmp_path))
    model, tokenizer = build_side_model(shape, spec)
    texts = make_word_texts(shape, 1, tokenizer)[:1] + [("Rate it: ", ["good.", "bad.", "good, bad."])]
    ours = AlignexpSide(shape, texts, model, tokenizer)
    theirs = TrlSide(shape, texts, build_side_model(shape, spec)[0], tokenizer)

    expected = [(e.prompt_ids, e.response_ids[k], e.response_ids[k + 1]) for e in ours.encoded for k in range(2)]
    assert [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in theirs.rows] == expected
    assert expected[2][0][0] == tokenizer.bos_token_id and expected[2][1][-1] == tokenizer.eos_token_id
    batch = theirs.collate(theirs.rows)  # chosen rows, then rejected rows, right-padded
    for i, (prompt, chosen, rejected) in enumerate(expected):
        for row, response in ((i, chosen), (i + len(expected), rejected)):
            n = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :n].tolist() == prompt + response
    assert theirs.own_tokenisation == {"pairs": 4, "differ": 2}  # the "Rate it: " pairs: " good" merges
    mine = [(lp[k], lp[k + 1]) for lp in ours.reference() for k in range(2)]
    assert torch.tensor(mine) == pytest.approx(torch.tensor(theirs.reference()), abs=1e-4)


def test_real_model_rows_skipped_without_the_folder(tmp_path, capsys):
    from alignexp.bench.cli import main

    missing = tmp_path / "smollm2-135m"
    report = main(["--parts", "real", "--real-model", str(missing)])
    line = [x for x in capsys.readouterr().out.splitlines() if "skipped" in x]
    assert line == [f"== Real model: skipped: no folder at {missing}; run make assets "
                    "(python -m alignexp.assets fetch smollm2-135m), or give --real-model PATH"]
    assert report["real"] == {"skipped": f"no folder at {missing}"}
