"""LoRA: the reference is the policy with its adapters off (one set of base weights), measured to take
less memory than a frozen copy; the reference cache is keyed by the base model; merged saving."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from alignexp.config import CONF_DIR, validate
from alignexp.lightning_modules.datamodule import RankingDataset, make_loader
from alignexp.lightning_modules.preference import OptimArgs, PreferenceModule
from alignexp.models.backbone import ModelArgs, build_model
from alignexp.models.logprobs import EncodedExample, pack, sequence_logps
from alignexp.models.lora import (
    AdaptersOff,
    LoraArgs,
    apply_lora,
    fingerprint_state,
    lora_args,
    merged_state_dict,
    save_pretrained_merged,
)
from alignexp.models.reference import cached_ref_logps, model_fingerprint
from alignexp.models.tokenizer import build_byte_tokenizer
from tests.conftest import allocated_bytes_over_time

TINY_ARCH = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "tiny.yaml").arch)
MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def _tiny(tokenizer, **kwargs):
    return build_model(ModelArgs(arch=TINY_ARCH, **kwargs), tokenizer)


def _encoded(count: int, seed: int = 0, prompt_len: int = 24, response_len: int = 12, n: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return [EncodedExample(torch.randint(0, 256, (prompt_len,), generator=generator).tolist(),
                           [torch.randint(0, 256, (response_len - k,), generator=generator).tolist() for k in range(n)])
            for _ in range(count)]


def _perturb_adapters(model) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_every_model_option_composes_and_validates(compose, model):
    cfg = compose(f"model={model}")
    validate(cfg)
    args = ModelArgs(**OmegaConf.to_container(cfg.model, resolve=True))
    assert args.name == model
    assert lora_args(args.lora) is None  # LoRA is off unless asked for
    if model == "smollm2_135m":  # the real model of the offline path: fp32 on the CPU, the asset where no hub
        assert args.path == "HuggingFaceTB/SmolLM2-135M" and args.asset == "smollm2-135m"
        assert args.arch["hidden_size"] == 576 and args.dtype == "float32"
    elif model != "tiny":
        assert args.path and args.arch["hidden_size"] == 4096 and args.dtype == "bfloat16"
        assert args.gradient_checkpointing
        on = compose(f"model={model}", "model.lora.enabled=true", "model.lora.r=8")
        assert lora_args(OmegaConf.to_container(on.model.lora)) == LoraArgs(r=8, alpha=32, dropout=0.05)


def test_model_paths_are_the_documented_checkpoints(compose):
    paths = {m: compose(f"model={m}").model.path for m in MODELS}
    assert paths == {"llama7b": "huggyllama/llama-7b", "mistral7b": "mistralai/Mistral-7B-v0.1",
                     "smollm2_135m": "HuggingFaceTB/SmolLM2-135M", "tiny": None,
                     "zephyr7b": "HuggingFaceH4/mistral-7b-sft-beta"}


def test_lora_settings_are_checked():
    assert lora_args(None) is None
    assert lora_args({"r": 4, "enabled": False}) is None
    assert lora_args({"r": 4, "target_modules": "all-linear"}).target_modules == "all-linear"
    with pytest.raises(ValueError, match=r"model\.lora\.rank: unknown key"):
        lora_args({"rank": 4})
    with pytest.raises(ValueError, match=r"model\.lora\.r must be >= 1"):
        lora_args({"r": 0})
    with pytest.raises(ValueError, match=r"model\.lora\.dropout"):
        lora_args({"dropout": 1.5})


# -- the reference: adapters off ----------------------------------------------------------------

def test_adapters_off_is_the_base_model(tokenizer):
    """After the adapters move, the policy changes and its adapters-off view still equals the base model."""
    base = _tiny(tokenizer)
    policy = apply_lora(_tiny(tokenizer), LoraArgs(r=4, dropout=0.1))
    _perturb_adapters(policy)
    reference = AdaptersOff(policy)
    batch = pack(_encoded(3), pad_id=tokenizer.pad_token_id)
    policy.train()
    with torch.no_grad():
        expected = sequence_logps(base.eval(), batch)[0]
        assert torch.allclose(sequence_logps(reference, batch)[0], expected, atol=1e-5)
        assert not torch.allclose(sequence_logps(policy.eval(), batch)[0], expected, atol=1e-2)
    # Generation (the engine calls the model itself) samples from the base model too.
    from alignexp.sampling.engine import SamplingParams, generate

    params = SamplingParams(temperature=1.0, max_new_tokens=6)
    prompts = [[tokenizer.bos_token_id, 10, 11, 12], [tokenizer.bos_token_id, 40, 41]]
    sample = lambda model: [g.token_ids for g in generate(model, prompts, params, eos_id=tokenizer.eos_token_id,  # noqa: E731
                                                          pad_id=tokenizer.pad_token_id, seeds=[1, 2])]
    assert sample(reference) == sample(base)
    # The view never changes the policy's mode or trainability, and holds no parameters of its own.
    policy.train()
    reference.eval().requires_grad_(False)
    assert policy.training and any(p.requires_grad for p in policy.parameters())
    assert list(reference.named_parameters()) == [] and next(reference.parameters()) is next(policy.parameters())


def test_reference_cache_is_keyed_by_the_base_model(tokenizer, tmp_path):
    """A LoRA run's reference (adapters off) reads and writes the same cache entry as its plain base model."""
    base = _tiny(tokenizer)
    policy = apply_lora(_tiny(tokenizer), LoraArgs(r=4))
    assert model_fingerprint(policy) == model_fingerprint(base)  # fresh adapters (B = 0): the same function
    _perturb_adapters(policy)
    assert model_fingerprint(policy) != model_fingerprint(base)
    assert model_fingerprint(AdaptersOff(policy)) == model_fingerprint(base)
    encoded = _encoded(4)
    rows = cached_ref_logps(AdaptersOff(policy), encoded, tokenizer.pad_token_id, tmp_path)
    files = list((tmp_path / "reference").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith(model_fingerprint(base))
    again = cached_ref_logps(base, encoded, tokenizer.pad_token_id, tmp_path)  # read back, not recomputed
    assert all(torch.equal(a, b) for a, b in zip(rows, again))
    assert set(fingerprint_state(AdaptersOff(policy))) == set(base.state_dict())


def test_lora_preference_training_moves_only_the_adapters(tokenizer, tmp_path):
    """Lightning fit, 3 steps, with the adapters-off reference and with the precomputed cache."""
    for reference_mode in ("adapters_off", "precompute"):
        policy = apply_lora(_tiny(tokenizer), LoraArgs(r=4, dropout=0.0))
        base_before = {k: v.clone() for k, v in fingerprint_state(AdaptersOff(policy)).items()}
        encoded = _encoded(6)
        ref_rows = None
        reference = AdaptersOff(policy)
        if reference_mode == "precompute":
            ref_rows = cached_ref_logps(reference, encoded, tokenizer.pad_token_id, tmp_path)
            reference = None
        module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=5e-2), reference=reference)
        loader = make_loader(RankingDataset(encoded, ref_rows), 2, tokenizer.pad_token_id, shuffle=False)
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, train_dataloaders=loader)
        after = fingerprint_state(AdaptersOff(policy))
        assert all(torch.equal(base_before[k], after[k]) for k in base_before), reference_mode
        lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
        assert any(p.abs().sum() > 0 for p in lora_b), reference_mode
        assert {n for n, p in policy.named_parameters() if p.requires_grad} == \
            {n for n, _ in policy.named_parameters() if "lora_" in n}


def test_gradient_checkpointing_reaches_the_adapters(tokenizer):
    policy = apply_lora(_tiny(tokenizer, gradient_checkpointing=True), LoraArgs(r=4, dropout=0.0))
    policy.train()
    sequence_logps(policy, pack(_encoded(2), pad_id=tokenizer.pad_token_id))[0].sum().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]  # A's gradient is 0 while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_merged_save_is_a_plain_model_and_leaves_the_base_weights(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = apply_lora(_tiny(tokenizer), LoraArgs(r=4))
    _perturb_adapters(policy)
    base_before = {k: v.clone() for k, v in fingerprint_state(AdaptersOff(policy)).items()}
    save_pretrained_merged(policy, tmp_path / "policy")
    assert not (tmp_path / "policy" / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    batch = pack(_encoded(2), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(sequence_logps(reloaded, batch)[0], sequence_logps(policy.eval(), batch)[0], atol=1e-4)
    assert all(torch.equal(base_before[k], v) for k, v in fingerprint_state(AdaptersOff(policy)).items())
    assert set(merged_state_dict(policy)) == set(reloaded.state_dict())


# -- memory ---------------------------------------------------------------------------------------

def _peak_bytes(fn) -> int:
    """Peak CPU bytes allocated inside ``fn`` (torch profiler's allocator counter, relative to its start)."""
    return max(allocated_bytes_over_time(fn))


def _preference_step(tokenizer, batch, use_lora: bool) -> None:
    """Build policy and reference as a run does, then one DPO step: forward, backward, AdamW step."""
    policy = _tiny(tokenizer)
    if use_lora:
        policy = apply_lora(policy, LoraArgs(r=8, dropout=0.0))
        reference = AdaptersOff(policy)
    else:
        reference = _tiny(tokenizer)  # the frozen copy train.py builds without LoRA
    module = PreferenceModule(policy, "dpo", {"beta": 0.1}, OptimArgs(lr=1e-3), reference=reference)
    optimizer = module.configure_optimizers()["optimizer"]
    module.compute_loss(batch).loss.backward()
    optimizer.step()


def test_lora_step_peaks_below_the_frozen_copy(tokenizer):
    """Measured, not assumed: the peak bytes of building policy + reference and taking one preference step."""
    batch = pack(_encoded(4), pad_id=tokenizer.pad_token_id)
    frozen = _peak_bytes(lambda: _preference_step(tokenizer, batch, use_lora=False))
    lora = _peak_bytes(lambda: _preference_step(tokenizer, batch, use_lora=True))
    params = sum(p.numel() * p.element_size() for p in _tiny(tokenizer).parameters())
    print(f"\npeak bytes of one DPO step, tiny model ({params} bytes of weights): frozen copy {frozen}, "
          f"LoRA r=8 adapters off {lora} ({lora / frozen:.2f}x)")
    # The frozen copy's run holds a second set of weights, full gradients and two AdamW states; which of
    # them coincide with the activations at the peak decides the gap, which is at least one set of weights.
    assert frozen - lora > params


def test_merged_state_of_the_reference_is_the_base_model(tokenizer):
    """The reference of a LoRA policy (:class:`AdaptersOff`) holds no weights of its own, yet what is synced
    into a sampler for it must be the base weights, every one of them (not its own, empty, state dict)."""
    base = _tiny(tokenizer)
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    policy = apply_lora(base, LoraArgs(r=4))
    _perturb_adapters(policy)
    reference = merged_state_dict(AdaptersOff(policy))
    assert set(reference) == set(plain)
    assert all(torch.equal(reference[k], v) for k, v in plain.items())
    trained = merged_state_dict(policy)
    assert any(not torch.equal(trained[k], v) for k, v in plain.items())  # the policy's own are merged


def test_a_small_lora_delta_survives_the_merge_into_bf16(tokenizer, tmp_path):
    """The delta is added to the bf16 base weight in fp32 and the sum rounded once. Worked case: a base
    weight 1.0 (bf16 spacing 2^-7 there) and a delta 2^-8 + 2^-17, just above half a spacing: the exact sum
    rounds up to 1 + 2^-7. Rounding the delta to bf16 first (8 significant bits) makes it exactly 2^-8, a
    tie that rounds to even, back to 1.0: the update would be lost."""
    from safetensors.torch import load_file

    policy = apply_lora(_tiny(tokenizer, dtype="bfloat16"), LoraArgs(r=1, alpha=1.0, dropout=0.0))
    layer = next(m for n, m in policy.named_modules() if hasattr(m, "lora_A") and "q_proj" in n)
    key = next(k for k in merged_state_dict(policy) if k.endswith("q_proj.weight") and ".0." in k)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.weight[0, 0] = 1.0
        layer.lora_A["default"].weight.zero_()
        layer.lora_B["default"].weight.zero_()
        layer.lora_A["default"].weight[0, 0] = 1.0
        layer.lora_B["default"].weight[0, 0] = 2.0**-8 + 2.0**-17
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps the adapters fp32
    save_pretrained_merged(policy, tmp_path / "policy")
    saved = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert saved[key].dtype == torch.bfloat16
    assert float(saved[key][0, 0]) == 1.0 + 2.0**-7
    assert float(torch.tensor(1.0, dtype=torch.bfloat16) + torch.tensor(2.0**-8 + 2.0**-17).bfloat16()) == 1.0
