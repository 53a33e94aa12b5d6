"""Building the backbone and its tokenizer: a tiny model from a config, or any HF causal LM by path."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from alignexp.args import ModelArgs
from alignexp.hub import ensure_offline_if_unreachable
from alignexp.inputs import ModelUnavailable, looks_local, missing_model_message
from alignexp.logs import log_once
from alignexp.models.attention import softcapped_attention_forward
from alignexp.models.tokenizer import apply_conventions, build_byte_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def attention_implementation(requested: str, device_type: str, model_class: type | None = None) -> str:
    """FlashAttention-2 when asked for (or ``auto``) on CUDA with ``flash_attn`` importable; else SDPA; else
    (``auto`` for an architecture that supports neither, such as Gemma-2, whose attention soft-capping
    SDPA cannot do) eager.

    ``model_class``: the causal-LM class that will be built (:func:`causal_lm_class`); an explicit
    implementation it does not support is refused here, naming it, instead of in transformers' loader.
    FlashAttention-2 takes no 4D attention mask, and the packed training forward
    (:func:`alignexp.models.logprobs.sequence_logps`, shared-prefix packing) needs one. A model
    built with ``flash_attention_2`` therefore runs every call that carries a 4D mask through SDPA
    (see :func:`route_block_masks_to_sdpa`): FlashAttention-2 serves generation and any forward with
    a padding mask, SDPA (its memory-efficient kernel on CUDA takes arbitrary masks) the packed
    forward.
    """
    def supports(implementation: str) -> bool:
        flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                "flex_attention": "_supports_flex_attn"}.get(implementation)
        return model_class is None or flag is None or bool(getattr(model_class, flag, True))

    if requested != "auto":
        if not supports(requested):
            from alignexp.errors import ConfigError

            raise ConfigError(f"model.attn_implementation={requested}: {model_class.__name__} does not support it "
                              f"(transformers refuses it for this architecture); use model.attn_implementation="
                              f"auto or eager")
        return requested
    if (device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None
            and supports("flash_attention_2")):
        return "flash_attention_2"
    return "sdpa" if supports("sdpa") else "eager"


def causal_lm_class(config) -> type | None:
    """The ``AutoModelForCausalLM`` class of ``config`` (None where transformers maps none to it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def decoder_layer_classes(model) -> list[str]:
    """The class names of ``model``'s repeated blocks, for FSDP's per-layer wrap: transformers'
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ``GPTJBlock``, ``GPTNeoXLayer``, ...)
    where it names classes the model has, else the classes of the decoder's ``layers``/``h``/``blocks``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    present = {type(m).__name__ for m in base.modules()}
    names = [n for n in (getattr(base, "_no_split_modules", None) or []) if n in present]
    if names:
        return names
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    for attribute in ("layers", "h", "blocks"):
        layers = getattr(decoder, attribute, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return sorted({type(layer).__name__ for layer in layers})
    return []


def _sdpa_for_block_masks(flash_forward, sdpa_forward):
    """An attention function: ``sdpa_forward`` for a 4D mask, ``flash_forward`` otherwise."""

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 4:
            if kwargs.get("softcap") is not None:  # SDPA has no soft-capping (Gemma-2): the eager computation
                return softcapped_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
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


def _describe_attention(attn: str, requested: str, device_type: str, model_class: type | None = None) -> str:
    if attn == "flash_attention_2":
        return "flash_attention_2 (FlashAttention-2; the packed forward's 4D block masks run through SDPA)"
    if attn == "eager" and requested == "auto" and model_class is not None:
        return f"eager ({model_class.__name__} does not support SDPA)"
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
    mismatch with the loaded config is logged. The attention implementation is the one asked for,
    or for ``auto`` the best the architecture supports (:func:`attention_implementation`). Unless
    ``args.parity_probe`` is false, the model's log-probs in both layouts are checked against its own
    forward (:mod:`alignexp.models.parity`): a layout that is off is not used, or the model is refused.
    LoRA is applied by the caller (:func:`alignexp.models.lora.apply_lora`), so models loaded for
    evaluation stay plain.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

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
        model_class = causal_lm_class(config)
        attn = attention_implementation(args.attn_implementation, device_type, model_class)
        if attn == "flash_attention_2":
            route_block_masks_to_sdpa(attn)
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        config = _from_pretrained(AutoConfig.from_pretrained, args.path, "model config")
        model_class = causal_lm_class(config)
        attn = attention_implementation(args.attn_implementation, device_type, model_class)
        if attn == "flash_attention_2":
            route_block_masks_to_sdpa(attn)
        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, args.path, "model",
                                 config=config, dtype=dtype, attn_implementation=attn)
        _check_arch(args, model.config)
    log_once(log, "model %s: %s, %d layers, %.3gM parameters, %s", args.name,
             f"{args.path} ({model.config.model_type})" if args.path else f"{model.config.model_type} built from "
             f"model.arch", getattr(model.config.get_text_config(), "num_hidden_layers", -1),
             sum(p.numel() for p in model.parameters()) / 1e6, args.dtype)
    log_once(log, "attention: %s", _describe_attention(attn, args.attn_implementation, device_type, model_class))
    if args.parity_probe:
        from alignexp.models.parity import check_layouts

        check_layouts(model, args.path or args.name)
    else:
        log.warning("model %s: parity probe skipped (model.parity_probe=false): its log-probs are not checked "
                    "against its own forward", args.name)
    if args.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach LoRA adapters behind frozen embeddings too.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


def model_config(args: ModelArgs, source: str | None):
    """The config of the model :func:`build_model` will build: ``source``'s (a folder or hub id; read, not
    downloaded) or, where ``source`` is None, the one ``args.arch`` describes."""
    from transformers import AutoConfig

    if source is None:
        arch = dict(args.arch)
        return AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
    return AutoConfig.from_pretrained(str(source))


def check_architecture(config, strategy: str, key: str) -> None:
    """Refuse, before anything is built, an architecture that alignexp cannot train exactly on ``strategy``
    (``hardware.strategy``): not a causal LM, a kind of layer neither log-prob layout implements
    (chunked attention, ...), bidirectional attention, or tied input and output embeddings under FSDP2.
    ``key``: the setting that chose the model, for the message."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from alignexp.errors import ConfigError
    from alignexp.models.attention import architecture_name, layer_windows

    name = architecture_name(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # by name: no modeling code is imported
        raise ConfigError(f"{key}: {name} is not a causal language model (AutoModelForCausalLM has no class for "
                          f"it); alignexp trains decoder-only models such as llama, mistral, qwen2, gemma2, gpt2")
    try:
        layer_windows(text)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}; use a model whose layers are full or sliding-window attention "
                          f"(llama, mistral, qwen2, gemma2, ...)") from None
    if getattr(text, "use_bidirectional_attention", False):
        raise ConfigError(f"{key}: {name} attends bidirectionally (use_bidirectional_attention=true), which the "
                          f"log-probs of a causal LM cannot use; use a causal checkpoint of the family")
    if strategy == "fsdp" and (getattr(config, "tie_word_embeddings", False) or
                               getattr(text, "tie_word_embeddings", False)):
        raise ConfigError(f"hardware=fsdp: {key}: {name} ties its output head to its input embeddings, which FSDP2 "
                          f"cannot shard as separate roots; use hardware=deepspeed_zero3 (or ddp)")


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
        if local and isinstance(error, ValueError):  # the files were read: transformers refused what they hold
            raise ModelUnavailable(f"{path}: transformers refused the {what} in this folder: {error}") from None
        if local:
            raise ModelUnavailable(f"{path}: the {what} in this folder could not be read: {error}") from None
        raise ModelUnavailable(
            f"{path}: no local folder of that name, and the hub "
            f"{'cannot be reached from here (offline mode)' if offline else 'did not serve it'}, so the {what} "
            f"cannot be loaded. Download it where there is network (`huggingface-cli download {path} "
            f"--local-dir /some/folder`) and point the setting at /some/folder.") from None
