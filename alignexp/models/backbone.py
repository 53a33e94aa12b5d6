"""Building the backbone and its tokenizer: a tiny model from a config, or any HF causal LM by path."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from alignexp.args import ModelArgs
from alignexp.hub import ensure_offline_if_unreachable
from alignexp.inputs import ModelUnavailable, looks_local, missing_model_message
from alignexp.models.tokenizer import apply_conventions, build_byte_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def attention_implementation(requested: str, device_type: str) -> str:
    """FlashAttention-2 when asked for (or ``auto``) on CUDA with ``flash_attn`` importable; else SDPA.

    FlashAttention-2 takes no 4D attention mask, and the packed training forward
    (:func:`alignexp.models.logprobs.sequence_logps`, shared-prefix packing) needs one. A model
    built with ``flash_attention_2`` therefore runs every call that carries a 4D mask through SDPA
    (see :func:`route_block_masks_to_sdpa`): FlashAttention-2 serves generation and any forward with
    a padding mask, SDPA (its memory-efficient kernel on CUDA takes arbitrary masks) the packed
    forward.
    """
    if requested != "auto":
        return requested
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _sdpa_for_block_masks(flash_forward, sdpa_forward):
    """An attention function: ``sdpa_forward`` for a 4D mask, ``flash_forward`` otherwise."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            return sdpa_forward(module, query, key, value, attention_mask, *args, **kwargs)
        return flash_forward(module, query, key, value, attention_mask, *args, **kwargs)

    attention.routes_block_masks_to_sdpa = True
    return attention


def route_block_masks_to_sdpa(implementation: str = "flash_attention_2") -> None:
    """Make the ``implementation`` entry of transformers' attention registry send 4D masks to SDPA.

    Transformers passes a 4D mask through to the attention function unchanged; FlashAttention-2
    would misread it (it expects a 2D padding mask) and, from the position ids, treat each packed row
    as one causal sequence, letting a response attend to the responses before it. Only calls with a
    4D mask change; called by :func:`build_model` when it picks FlashAttention-2 (idempotent).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    current = AttentionInterface._global_mapping[implementation]
    if getattr(current, "routes_block_masks_to_sdpa", False):
        return
    AttentionInterface.register(implementation, _sdpa_for_block_masks(current, sdpa_attention_forward))


def _describe_attention(attn: str, requested: str, device_type: str) -> str:
    if attn == "flash_attention_2":
        return "flash_attention_2 (FlashAttention-2; the packed forward's 4D block masks run through SDPA)"
    if attn == "sdpa" and requested == "auto":
        why = "flash_attn is not importable" if device_type == "cuda" else f"on {device_type}"
        return f"sdpa (torch scaled_dot_product_attention; {why})"
    return attn


def build_tokenizer(args: ModelArgs):
    """The tokenizer at ``args.path``, or the local byte-level one for a model built from ``arch``."""
    if args.path is None:
        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, args.path, "tokenizer")
    conventions = apply_conventions(tokenizer, args.path)  # BOS, EOS, pad, chat template (models/tokenizer.py)
    log.info("tokenizer of %s: %s", args.path, ", ".join(f"{k} {v}" for k, v in conventions.items()))
    return tokenizer


def build_model(args: ModelArgs, tokenizer, device_type: str = "cpu"):
    """The causal LM: built from ``args.arch`` with seeded weights, or loaded from ``args.path``.

    ``args.arch`` may set ``vocab_size`` (a 7B architecture's 32000 rows) as long as it covers the
    tokenizer; otherwise the vocabulary is the tokenizer's. With ``args.path``, a non-empty ``arch``
    is the architecture the checkpoint is expected to have (what ``alignexp.plan`` reads): a
    mismatch with the loaded config is logged. LoRA is applied by the caller
    (:func:`alignexp.models.lora.apply_lora`), so models loaded for evaluation stay plain.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = attention_implementation(args.attn_implementation, device_type)
    if attn == "flash_attention_2":
        route_block_masks_to_sdpa(attn)
    dtype = DTYPES[args.dtype]
    if args.path is None:
        arch = dict(args.arch)
        model_type = arch.pop("model_type", "llama")
        vocab_size = int(arch.pop("vocab_size", len(tokenizer)))
        if vocab_size < len(tokenizer):
            raise ValueError(f"model.arch.vocab_size={vocab_size} is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens")
        config = AutoConfig.for_model(model_type, vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      **arch)
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, args.path, "model",
                                 dtype=dtype, attn_implementation=attn)
        _check_arch(args, model.config)
    log.info("attention: %s", _describe_attention(attn, args.attn_implementation, device_type))
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach LoRA adapters behind frozen embeddings too.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


def _check_arch(args: ModelArgs, config) -> None:
    """Log the ``model.arch`` entries that the loaded checkpoint's config contradicts."""
    differ = {k: (v, getattr(config, k, None)) for k, v in args.arch.items()
              if k != "model_type" and getattr(config, k, v) != v}
    if args.arch.get("model_type") not in (None, getattr(config, "model_type", None)):
        differ["model_type"] = (args.arch["model_type"], getattr(config, "model_type", None))
    if differ:
        log.warning("model.path=%s: its config differs from model.arch (used by alignexp.plan): %s", args.path,
                    ", ".join(f"{k}: arch {a!r}, checkpoint {b!r}" for k, (a, b) in sorted(differ.items())))


def _from_pretrained(loader, path: str, what: str, **kwargs):
    """``loader(path)`` with a clear message when the path is neither a local folder with a model nor a hub id
    that is cached or reachable (a local-looking path is never sent to the hub)."""
    local = looks_local(path)
    if local:
        problem = missing_model_message(path, None, what, weights=what != "tokenizer")
        if problem:
            raise ModelUnavailable(problem)
    else:
        ensure_offline_if_unreachable()
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        if local:
            raise ModelUnavailable(f"{path}: the {what} in this folder could not be loaded: {error}") from None
        raise ModelUnavailable(
            f"{path}: no local folder of that name, and the hub "
            f"{'cannot be reached from here (offline mode)' if offline else 'did not serve it'}, so the {what} "
            f"cannot be loaded. Download it where there is network (`huggingface-cli download {path} "
            f"--local-dir /some/folder`) and point the setting at /some/folder.") from None
