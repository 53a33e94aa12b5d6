"""The architecture matrix: tiny random models of 14 Hugging Face families, each saved to a folder with the
byte tokenizer and loaded back the way ``model.path=<folder>`` loads it (auto attention, the parity probe),
then checked against its own plain forward: summed response log-probs on both layouts (padding-free and
padded) equal ``prompt + response`` run alone through ``model(...)`` (its own masks, attention, head and
soft-capping) to 1e-4 in fp32, the gradients of a DPO step equal on both layouts, and the saved policy
reloaded by ``from_pretrained`` gives the same logits. Sliding windows (4 tokens) are shorter than the
sequences, families that mix sliding and full layers have both kinds, and soft-capping (5.0) is small
enough to matter: each test also checks that the feature it covers changes the log-probs, so that a
layout ignoring it could not pass.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_logprobs import BOS, PAD, ids

from alignexp.losses import get_loss
from alignexp.models import parity
from alignexp.models.attention import padding_free_supported
from alignexp.models.backbone import ModelArgs, build_model, build_tokenizer
from alignexp.models.dropout import disable_dropout
from alignexp.models.logprobs import EncodedExample, logit_softcap, pack, sequence_logps

WINDOW = 4
CAP = 5.0
LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
MIXED = {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}
FAMILIES: dict[str, dict] = {
    "llama": LLAMA_LIKE,
    "mistral": {**LLAMA_LIKE, "sliding_window": WINDOW},
    "qwen2": {**LLAMA_LIKE, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {**LLAMA_LIKE, "head_dim": 8, "use_sliding_window": True, "sliding_window": WINDOW,
              "max_window_layers": 1},
    "gemma2": {**LLAMA_LIKE, "head_dim": 8, **MIXED, "final_logit_softcapping": CAP, "attn_logit_softcapping": CAP},
    "gemma3_text": {**LLAMA_LIKE, "head_dim": 8, **MIXED, "final_logit_softcapping": CAP},
    "phi3": {**LLAMA_LIKE, "sliding_window": WINDOW},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "gpt_neox": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "gptj": {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 128},
    "opt": {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 32, "max_position_embeddings": 128, "init_std": 0.3},
    "falcon": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4},
    "olmo2": LLAMA_LIKE,
    "smollm3": {**LLAMA_LIKE, "use_sliding_window": True, **MIXED},
}
"""Tiny configs (``model.arch``) of each family; weights drawn with a wide init (``initializer_range`` 0.3) so
that attention, windows and soft-capping visibly move the log-probs."""
PADDED_ONLY = {"falcon"}  # its layers drop the layout's keyword arguments: the padded layout, with a warning


def installed(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelArgs())


def examples() -> list[EncodedExample]:
    """Prompts of 8 and 5 tokens, responses of 3 to 9: most longer than the window."""
    return [EncodedExample([BOS] + ids(31, 7, eos=False), [ids(32, 9), ids(33, 6)]),
            EncodedExample([BOS] + ids(34, 4, eos=False), [ids(35, 7), ids(36, 3)])]


def save_family(family: str, folder: Path, tokenizer) -> Path:
    """A seeded random model of ``family`` saved with the byte tokenizer, as ``model.path`` reads it."""
    arch = {"model_type": family, "initializer_range": 0.3, **FAMILIES[family]}
    model = build_model(ModelArgs(name=family, arch=arch, attn_implementation="eager", parity_probe=False), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def plain_logps(model, batch_examples, attention_mask=None) -> torch.Tensor:
    """(B, n) summed response log-probs, each prompt + response alone through the model's own forward
    (``attention_mask``: a 4D mask given instead of the model's own, to switch its windows off)."""
    out = torch.zeros(len(batch_examples), 2)
    for b, ex in enumerate(batch_examples):
        for k, r in enumerate(ex.response_ids):
            sequence = torch.tensor([ex.prompt_ids + r])
            mask = None if attention_mask is None else attention_mask(sequence.shape[1])
            logits = model(input_ids=sequence, attention_mask=mask).logits[0, len(ex.prompt_ids) - 1:-1]
            out[b, k] = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(r)[:, None]).sum()
    return out


def full_causal(length: int) -> torch.Tensor:
    """An additive causal (1, 1, T, T) mask: no window."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def dpo_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One DPO loss (reference: the same model, no gradient) and its gradients."""
    model.zero_grad()
    with torch.no_grad():
        ref = sequence_logps(model, batch)[0]
    policy, lengths, mask = sequence_logps(model, batch)
    loss = get_loss("dpo").fn(policy + 0.1 * torch.tensor([[1.0, -1.0]]), ref, lengths, mask=mask, beta=0.1).loss
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family, tokenizer, tmp_path, caplog):
    if not installed(family):
        pytest.skip(f"transformers {__import__('transformers').__version__} has no {family}")
    folder = save_family(family, tmp_path / family, tokenizer)
    parity._VERDICTS.clear()
    caplog.set_level("INFO")
    model = build_model(ModelArgs(path=str(folder)), build_tokenizer(ModelArgs(path=str(folder))))
    assert any("parity probe of" in r.getMessage() for r in caplog.records)  # the probe ran at build
    decoder = model.get_decoder()
    assert padding_free_supported(decoder) == (family not in PADDED_ONLY)
    model.eval()
    batch_examples = examples()
    batch = pack(batch_examples, pad_id=PAD)
    with torch.no_grad():
        expected = plain_logps(model, batch_examples)
        assert expected.std() > 0.5  # not a degenerate (uniform) model
        for layout in (batch, dataclasses.replace(batch, flat=None)):
            torch.testing.assert_close(sequence_logps(model, layout)[0], expected, atol=1e-4, rtol=0)
        config = model.config
        if getattr(config, "sliding_window", None):  # the window matters: without it the log-probs move
            assert (plain_logps(model, batch_examples, full_causal) - expected).abs().max() > 1e-2
        if logit_softcap(model) is not None:  # so does the soft-capping of the logits
            head = model.get_output_embeddings()
            raw = torch.log_softmax(head(decoder(input_ids=torch.tensor([[BOS, 5, 6, 7]])).last_hidden_state), -1)
            capped = torch.log_softmax(model(input_ids=torch.tensor([[BOS, 5, 6, 7]])).logits, -1)
            assert (raw - capped).abs().max() > 1e-2
    # a DPO step: the same loss and gradients on both layouts; then an optimiser step moves the log-probs
    model.train()
    disable_dropout(model)  # as the training modules do
    loss, grads = dpo_grads(model, batch)
    padded_loss, padded_grads = dpo_grads(model, dataclasses.replace(batch, flat=None))
    torch.testing.assert_close(loss, padded_loss, atol=1e-5, rtol=0)
    for g, h in zip(grads, padded_grads):
        torch.testing.assert_close(g, h, atol=1e-4, rtol=1e-3)
    assert torch.isfinite(loss) and any(g.abs().max() > 0 for g in grads)
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 1.0 * g
    model.eval()
    # save and reload: from_pretrained gives the same logits
    model.save_pretrained(tmp_path / "policy")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    sequence = torch.tensor([batch_examples[0].prompt_ids + batch_examples[0].response_ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=sequence).logits, model(input_ids=sequence).logits,
                                   atol=1e-5, rtol=0)
        after = sequence_logps(model, batch)[0]
        assert (after - expected).abs().max() > 1e-3  # the step moved the policy
        torch.testing.assert_close(after, plain_logps(model, batch_examples), atol=1e-4, rtol=0)


# -- the bullets of the matrix, one by one ------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """Folders of saved tiny models, by family (built once per module)."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_family(family, root / family, tokenizer)
        return cache[family]

    return get


def test_auto_attention_loads_gemma2_and_a_refused_implementation_names_the_reason(saved, tokenizer):
    """Transformers refuses SDPA for Gemma-2 (SDPA cannot soft-cap): ``auto`` picks eager, and an explicit
    ``sdpa`` is refused before loading with that reason, not as a folder that "could not be loaded"."""
    from transformers import Gemma2ForCausalLM, LlamaForCausalLM

    from alignexp.errors import ConfigError
    from alignexp.models.backbone import attention_implementation

    assert attention_implementation("auto", "cpu", Gemma2ForCausalLM) == "eager"
    assert attention_implementation("auto", "cpu", LlamaForCausalLM) == "sdpa"
    model = build_model(ModelArgs(path=str(saved("gemma2"))), tokenizer)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.attn_implementation=sdpa: Gemma2ForCausalLM does not support it"):
        build_model(ModelArgs(path=str(saved("gemma2")), attn_implementation="sdpa"), tokenizer)
    # a reward model (a judge, or PPO's) from the same folder chooses its attention the same way
    from alignexp.judges.reward_model import build_reward_model

    reward = build_reward_model(ModelArgs(path=str(saved("gemma2"))), tokenizer)
    assert type(reward).__name__ == "Gemma2ForSequenceClassification"
    assert reward.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="Gemma2ForCausalLM does not support it"):
        build_reward_model(ModelArgs(path=str(saved("gemma2")), attn_implementation="sdpa"), tokenizer)


def test_a_model_path_is_named_by_its_folder_and_not_compared_with_the_tiny_preset(saved, tokenizer, caplog):
    """``model.path=`` over the default (tiny) preset: the model is named by its folder (or hub id), and the
    preset's ``arch`` (which describes the model it builds) is not compared with the checkpoint; a named
    preset's ``arch`` still is."""
    args = ModelArgs(path=str(saved("qwen2")), arch={"model_type": "llama", "hidden_size": 128})
    assert args.name == "qwen2" and args.arch == {}
    assert ModelArgs(path="HuggingFaceTB/SmolLM2-135M").name == "HuggingFaceTB/SmolLM2-135M"
    caplog.set_level("INFO")
    build_model(args, tokenizer)
    text = caplog.text
    assert "differs from model.arch" not in text and "model qwen2: " in text and "(qwen2)" in text
    caplog.clear()
    named = ModelArgs(name="llama7b", path=str(saved("qwen2")), arch={"model_type": "llama"})
    build_model(named, tokenizer)
    assert "its config differs from model.arch" in caplog.text


def test_layers_that_drop_the_layout_fall_back_to_the_padded_one(saved, tokenizer, caplog):
    """Falcon's layers drop extra keyword arguments, so the block layout never reaches the attention: even
    with the probe skipped, the first forward notices, warns and takes the padded layout (exact)."""
    model = build_model(ModelArgs(path=str(saved("falcon")), parity_probe=False), tokenizer).eval()
    batch_examples = examples()
    with torch.no_grad():
        logps = sequence_logps(model, pack(batch_examples, pad_id=PAD))[0]
        torch.testing.assert_close(logps, plain_logps(model, batch_examples), atol=1e-4, rtol=0)
    assert "did not pass the block layout to their attention" in caplog.text
    assert not padding_free_supported(model.get_decoder())


def test_the_probe_refuses_a_wrong_padded_layout_and_drops_a_wrong_padding_free_one(saved, tokenizer,
                                                                                     monkeypatch, caplog):
    """The probe against the model's own forward: a padding-free layout that ignores the per-layer windows
    is dropped with a warning (the padded layout serves); a padded one that does is refused, naming the
    architecture and the layout."""
    from alignexp.models import attention, logprobs

    folder = str(saved("gemma2"))
    real = attention.block_attention
    monkeypatch.setattr(attention, "block_attention",
                        lambda *a, **k: real(*a, **{**k, "sliding_window": None}))
    parity._VERDICTS.clear()
    model = build_model(ModelArgs(path=folder), tokenizer)
    assert not padding_free_supported(model.get_decoder())
    assert "parity probe:" in caplog.text and "it uses the padded layout" in caplog.text
    monkeypatch.setattr(attention, "block_attention", real)
    monkeypatch.setattr(logprobs, "layer_windows", lambda config: None)  # every layer the same: wrong here
    parity._VERDICTS.clear()
    with pytest.raises(parity.UnsupportedModel, match=r"gemma2 \(Gemma2ForCausalLM\).*padded layout"):
        build_model(ModelArgs(path=folder), tokenizer)
    parity._VERDICTS.clear()
    build_model(ModelArgs(path=folder, parity_probe=False), tokenizer)  # skipped, and said so
    assert "parity probe skipped (model.parity_probe=false)" in caplog.text


def test_the_probe_shrinks_windows_so_that_they_matter(saved, tokenizer):
    """Real windows (4096) are longer than the probe's sequences: the probe shrinks them, so a layout that
    ignored them would differ from the plain forward on the probe batch itself."""
    model = build_model(ModelArgs(path=str(saved("mistral")), parity_probe=False), tokenizer).eval()
    model.config.sliding_window = 4096
    probe = parity.probe_examples(model.config.vocab_size)
    with torch.no_grad():
        wide = parity.plain_logps(model, probe)
        with parity.shrunk_windows(model, parity.PROBE_WINDOW) as has_window:
            narrow = parity.plain_logps(model, probe)
        assert has_window and model.config.sliding_window == 4096  # restored
        assert (wide - narrow).abs().max() > 1e-2


def test_decoder_layer_classes_name_every_familys_blocks(saved, tokenizer):
    """FSDP's per-layer wrap needs the class of each family's repeated block, which is not always a
    ``...DecoderLayer`` (GPT-2, GPT-J, GPT-NeoX: the DPO paper's own backbones)."""
    from alignexp.models.backbone import decoder_layer_classes

    expected = {"gpt2": ["GPT2Block"], "gptj": ["GPTJBlock"], "gpt_neox": ["GPTNeoXLayer"],
                "gemma2": ["Gemma2DecoderLayer"]}
    for family, names in expected.items():
        model = build_model(ModelArgs(path=str(saved(family)), parity_probe=False), tokenizer)
        assert decoder_layer_classes(model) == names
        assert all(any(type(m).__name__ == n for m in model.modules()) for n in names)


def test_preflight_refuses_what_cannot_be_trained_exactly(saved, tokenizer):
    """In the first seconds, before any model is built: tied embeddings under FSDP2, a kind of layer the
    layouts do not implement, a model that is not a causal LM; each named, with what to use instead."""
    from transformers import AutoConfig

    from alignexp.errors import ConfigError
    from alignexp.models.backbone import check_architecture, model_config

    gpt2 = model_config(ModelArgs(), str(saved("gpt2")))  # GPT-2 ties its head to its embeddings
    check_architecture(gpt2, "ddp", "model.path")
    with pytest.raises(ConfigError, match=r"hardware=fsdp: model.path: gpt2 \(GPT2LMHeadModel\) ties .* use "
                                          r"hardware=deepspeed_zero3"):
        check_architecture(gpt2, "fsdp", "model.path")
    check_architecture(model_config(ModelArgs(), str(saved("llama"))), "fsdp", "model.path")
    chunked = model_config(ModelArgs(), str(saved("qwen2")))
    chunked.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(ConfigError, match=r"\['chunked_attention'\] are not supported.*use a model whose layers"):
        check_architecture(chunked, "ddp", "model.path")
    with pytest.raises(ConfigError, match="t5 is not a causal language model.*such as llama"):
        check_architecture(AutoConfig.for_model("t5"), "ddp", "model.path")
    tiny = model_config(ModelArgs(arch={"model_type": "llama", "tie_word_embeddings": True}), None)
    with pytest.raises(ConfigError, match="ties its output head"):
        check_architecture(tiny, "fsdp", "model.arch")


@pytest.mark.slow  # about 20 s on 2 busy cores: a whole run
def test_a_gemma2_folder_trains_end_to_end(tokenizer, tmp_path):
    """``python -m alignexp.train model.path=<gemma2 folder> debug=fast loss=dpo``: the folder loads (eager
    attention, chosen by auto), the probe passes both layouts, the run is named after the folder and its
    checkpoint is not compared with the tiny preset, and it ends with eval.json."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    folder = save_family("gemma2", tmp_path / "gemma2", tokenizer)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "alignexp.train", f"model.path={folder}", "debug=fast", "loss=dpo",
                             "eval.progress=false", f"paths.output_dir={out}"], cwd=REPO, capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                 "ALIGNEXP_CACHE_DIR": str(tmp_path / "cache")})
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "attention: eager (Gemma2ForCausalLM does not support SDPA)" in log
    assert "parity probe of" in log and "padding-free" in log and "padding-free not used" not in log
    assert "differs from model.arch" not in log and "model: gemma2;" in log
    assert json.loads((out / "eval.json").read_text())["model"] == "gemma2"


def test_reward_model_scores_follow_per_layer_windows(tokenizer):
    """A reward model's packed forward (its padded rows) takes each kind of layer's window as its policy's
    does: Qwen2 with a full layer then a sliding one, scores equal to each prompt + response alone."""
    from alignexp.judges.reward_model import build_reward_model, sequence_scores

    arch = {"model_type": "qwen2", "initializer_range": 0.3, **FAMILIES["qwen2"]}
    model = build_reward_model(ModelArgs(arch=arch, attn_implementation="sdpa"), tokenizer).eval()
    batch_examples = examples()
    with torch.no_grad():
        scores = sequence_scores(model, pack(batch_examples, pad_id=PAD))
        expected = torch.tensor([[model(input_ids=torch.tensor([ex.prompt_ids + r])).logits[0, 0].item()
                                  for r in ex.response_ids] for ex in batch_examples])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
