"""The memory formulas of ``python -m alignexp.plan``: parameter counts, model states per strategy,
activations of a packed micro-batch (the docstring of :mod:`alignexp.plan` says what each counts)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from alignexp.args import HardwareArgs, LoraArgs

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# AdamW keeps two states (momentum, variance) per trainable parameter.
ADAM_STATES = 2


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts and the dimensions the activation estimate needs.

    ``largest_module``: the most parameters any single module holds itself (not counting its
    children), as DeepSpeed's ``model_to_params`` counts it (the embedding or output head of a 7B
    model). ``layer``: one decoder layer; ``outside_layers``: embeddings, final norm and head.
    ``trainable``: every parameter, or the LoRA adapters' alone.
    """

    total: int
    trainable: int
    largest_module: int
    layer: int
    outside_layers: int
    n_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    lora_inputs: int = 0  # summed input width of the adapted linears of one layer (activation estimate)
    lora_rank: int = 0
    lora_modules: int = 0  # adapted linears per layer


def _arch_config(arch: dict[str, Any]):
    from transformers import AutoConfig

    arch = dict(arch)
    model_type = arch.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **arch)


@functools.lru_cache(maxsize=16)
def _meta_counts(arch_json: str) -> tuple[int, int, int]:
    """(total, largest_module, layer) of the model built on the meta device: exact, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _arch_config(json.loads(arch_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layer = next(sum(p.numel() for p in m.parameters()) for m in model.modules()
                 if type(m).__name__.endswith("DecoderLayer"))
    return total, largest, layer


ANALYTIC_TYPES = ("llama", "mistral")


def llama_counts(h: int, i: int, heads: int, kv: int, d: int, vocab: int, n_layers: int, tied: bool,
                 attn_bias: bool = False, mlp_bias: bool = False) -> tuple[int, int, int, int]:
    """(total, largest module, one layer, outside the layers) of a Llama/Mistral decoder in closed form (see
    :func:`count_parameters`); plain arithmetic, so preflight can use it without importing transformers."""
    attention = h * (heads + 2 * kv) * d + heads * d * h + (attn_bias * ((heads + 2 * kv) * d + h))
    layer = attention + 3 * h * i + mlp_bias * (2 * i + h) + 2 * h
    embedding = vocab * h
    outside = embedding + h + (0 if tied else embedding)
    return n_layers * layer + outside, max(embedding, h * i + mlp_bias * i, heads * d * h), layer, outside


def count_parameters(arch: dict[str, Any], lora: LoraArgs | None = None) -> ModelCounts:
    """Parameter counts of the causal LM that ``arch`` (a ``conf/model`` ``arch`` mapping) describes.

    Llama and Mistral are counted in closed form (embedding V*h; per layer the q, k, v, o projections
    h*(H + 2*H_kv)*d + H*d*h, the gated MLP 3*h*i and two RMSNorms 2h; final norm h; an untied head
    V*h); any other ``model_type`` is built on the meta device and counted.
    """
    config = _arch_config(arch)
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d = getattr(config, "head_dim", None) or h // heads
    vocab, n_layers = config.vocab_size, config.num_hidden_layers
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if config.model_type in ANALYTIC_TYPES:
        total, largest, layer, outside = llama_counts(
            h, i, heads, kv, d, vocab, n_layers, tied, bool(getattr(config, "attention_bias", False)),
            bool(getattr(config, "mlp_bias", False)))
    else:
        total, largest, layer = _meta_counts(json.dumps(dict(arch), sort_keys=True))
        outside = total - n_layers * layer
    trainable, lora_inputs, lora_modules = total, 0, 0
    if lora is not None:
        shapes = {"q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        names = list(shapes) if lora.target_modules == "all-linear" else list(lora.target_modules)
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ValueError(f"model.lora.target_modules: {unknown[0]!r} is not a linear layer of a "
                             f"{config.model_type} decoder layer (known: {', '.join(shapes)})")
        trainable = n_layers * sum(lora.r * (shapes[n][0] + shapes[n][1]) for n in names)
        lora_inputs = sum(shapes[n][0] for n in names)
        lora_modules = len(names)
    return ModelCounts(total=total, trainable=trainable, largest_module=largest, layer=layer,
                       outside_layers=outside, n_layers=n_layers, hidden=h, intermediate=i, heads=heads,
                       kv_heads=kv, head_dim=d, vocab=vocab, lora_inputs=lora_inputs,
                       lora_rank=lora.r if lora else 0, lora_modules=lora_modules)


@dataclass
class ModelStates:
    """Bytes per GPU of weights, gradients and optimizer states (and what offload puts on the CPU)."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float = 0.0  # parameters gathered for the module being computed (ZeRO-3, FSDP)
    cpu: float = 0.0  # offloaded bytes per GPU's process (host memory)

    @property
    def gpu(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered


def model_state_bytes(counts: ModelCounts, hw: HardwareArgs, model_dtype: str, gpus: int) -> ModelStates:
    """Per-GPU model-state bytes for ``counts`` under ``hw``'s strategy on ``gpus`` data-parallel GPUs.

    N = all parameters, T = trainable ones, F = N - T frozen (LoRA's base weights).

    * DeepSpeed (bf16): 2 bytes per 16-bit parameter; per trainable parameter a 16-bit gradient
      (2 bytes; stage 1 keeps it whole, stage 2 partitions it, stage 3 reduce-scatters it straight
      into the fp32 partition), the fp32 gradient partition (4) and the optimizer's fp32 master
      weight, momentum and variance (4 + 4 + 4), partitioned over the GPUs from stage 1; stage 3
      partitions the 16-bit parameters too and gathers the largest module's 16-bit parameters and
      gradients (4 bytes per parameter) while it runs. So stage 2: 2N + 18T/G, stage 3:
      18N/G + 4 x largest module (full fine-tuning). Offloaded optimizer: the fp32 gradients, master
      weights and moments live on the CPU; offloaded parameters (stage 3): the 16-bit parameters too.
    * FSDP2: parameters, gradients and AdamW states sharded (FULL_SHARD); under mixed precision the
      trainable parameters are fp32 master weights (4 + 4 + 8 bytes), else the model's dtype; the
      units being computed are gathered in bf16 (the decoder's root, and a decoder layer with the next
      one prefetched and its gradient: 2 bytes x (outside + 3 x layer)). SHARD_GRAD_OP keeps the
      gathered bf16 parameters through the step (2 bytes x N).
    * DDP / one device: weights, gradients and AdamW states, fp32 for the trainable parameters under
      mixed precision (the master weights alignexp keeps there), else in the model's dtype (LoRA
      adapters in fp32 either way); DDP adds its gradient buckets, a copy of the gradients.
    """
    n, t = float(counts.total), float(counts.trainable)
    f = n - t
    lora = counts.trainable < counts.total
    if hw.strategy == "deepspeed":
        stage = hw.zero_stage
        params16 = 2 * n / gpus if stage == 3 else 2 * n
        grads16 = 2 * t / gpus if stage == 2 else 2 * t
        if stage == 3 or (stage == 2 and hw.offload_optimizer):
            grads16 = 0.0  # reduce-scattered straight into the fp32 partition (on the CPU when offloaded)
        grads32 = 4 * t / gpus  # the fp32 gradient partition the optimizer steps on
        optimizer = (4 + 4 + 4) * t / gpus  # fp32 master weights, momentum, variance
        cpu = 0.0
        if hw.offload_optimizer:
            cpu, grads32, optimizer = grads32 + optimizer, 0.0, 0.0
        if hw.offload_parameters:
            cpu, params16 = cpu + params16, 0.0
        gathered = 4 * counts.largest_module if stage == 3 else 0.0
        return ModelStates(weights=params16, gradients=grads16 + grads32, optimizer=optimizer, gathered=gathered,
                           cpu=cpu)
    p = DTYPE_BYTES[model_dtype]
    # PEFT keeps adapters (and so their gradients and states) in fp32; mixed precision holds fp32 master weights
    trainable_bytes = 4 if lora or hw.precision.endswith("-mixed") else p
    weights = f * p + t * trainable_bytes
    gradients = t * trainable_bytes
    optimizer = ADAM_STATES * t * trainable_bytes
    if hw.strategy == "fsdp":
        shard = gpus
        gathered = 2 * (counts.outside_layers + 3 * counts.layer)
        if hw.sharding_strategy == "SHARD_GRAD_OP":
            gathered = 2 * n
        cpu = 0.0
        weights, gradients, optimizer = weights / shard, gradients / shard, optimizer / shard
        if hw.cpu_offload:
            cpu, weights, gradients, optimizer = weights + gradients + optimizer, 0.0, 0.0, 0.0
        return ModelStates(weights, gradients, optimizer, gathered=gathered, cpu=cpu)
    if hw.strategy in ("ddp", "fsdp") and gpus > 1:
        gradients *= 2  # DDP's reduction buckets hold a second copy of the gradients
    return ModelStates(weights, gradients, optimizer)


@dataclass
class Activations:
    """Bytes of one micro-batch's activations: ``saved`` (held from forward to backward), ``backward``
    (working set on top of it during backward), ``reference`` (a reference forward's transient bytes)."""

    saved: float
    backward: float
    reference: float

    @property
    def peak(self) -> float:
        return self.saved + max(self.backward, self.reference)


def layer_bytes_per_token(counts: ModelCounts, act_bytes: int, lora_dropout: bool = False) -> float:
    """Bytes autograd keeps per token for one Llama/Mistral decoder layer (SDPA, no attention dropout).

    Counted from the HF modules: each RMSNorm keeps its input upcast to fp32 (4h) and its normalised
    output and scaled output (2 x a*h); attention keeps q, k, v (k and v repeated to all heads when a
    mask is given), SDPA's output and the output projection's input (5 x a*h); the gated MLP keeps
    the gate output, its SiLU, the up projection and their product (4 x a*i). Total
    ``8h + a*(9h + 4i)`` bytes (a = activation bytes: 2 in bf16, 4 in fp32). LoRA adds, per adapted
    linear, its r-wide intermediate, and with dropout its dropped-out input and mask.
    """
    h, i = counts.hidden, counts.intermediate
    size = 8 * h + act_bytes * (9 * h + 4 * i)
    if counts.lora_modules:
        size += act_bytes * counts.lora_rank * counts.lora_modules
        if lora_dropout:
            size += (act_bytes + 1) * counts.lora_inputs
    return float(size)


def activation_bytes(counts: ModelCounts, rows: int, prompt_len: int, response_len: int, n_responses: int,
                     act_bytes: int, checkpointing: bool, reference_forward: bool, lora_dropout: bool = False,
                     bias_per_layer: bool = False) -> Activations:
    """Activations of ``rows`` packed rows, each ``prompt_len + n_responses * response_len`` tokens.

    Per row of T tokens: L layers x T x :func:`layer_bytes_per_token`, plus the block mask: the
    boolean (B, 1, T, T) mask of the batch (T^2 bytes per row) and the additive mask that
    :func:`alignexp.models.logprobs.response_states` makes of it once per forward (a*T^2 per row),
    which every layer's SDPA keeps for backward, shared (``bias_per_layer=True`` counts one copy per
    layer, for code that lets SDPA convert a boolean mask in every layer). Also shared by all layers:
    the rotary cos and sin tables (2 x a*d per token). Under gradient checkpointing only each
    layer's input (a*h per token) is kept, and one layer's activations are recomputed in backward.
    The output head runs on the
    N = rows x n x response_len response tokens only: the final norm keeps its fp32 input and its
    output (4h + a*h per token), the head its gathered input (a*h per response token), the fp32
    log-softmax its output (4NV); backward adds their gradient and the logits' gradient (8NV) and
    gradient buffers of a layer's width. A reference forward under no_grad (frozen copy or adapters
    off) holds its 16-bit and fp32 logits and log-softmax (10NV) and one layer's transients.
    """
    t = prompt_len + n_responses * response_len
    tokens = rows * t
    response_tokens = rows * n_responses * response_len
    h, v = counts.hidden, counts.vocab
    bias = act_bytes * rows * t * t
    layer = layer_bytes_per_token(counts, act_bytes, lora_dropout) * tokens + (bias if bias_per_layer else 0)
    if checkpointing:
        layers = counts.n_layers * act_bytes * h * tokens
        recompute = layer
    else:
        layers = counts.n_layers * layer
        recompute = 0.0
    shared = rows * t * t + 2 * act_bytes * counts.head_dim * tokens + (0 if bias_per_layer else bias)
    head = (4 * h + act_bytes * h) * tokens + act_bytes * h * response_tokens + 4 * response_tokens * v
    saved = layers + shared + head
    backward = recompute + 8 * response_tokens * v + 2 * act_bytes * max(h, counts.intermediate) * tokens
    reference = (10 * response_tokens * v + act_bytes * (h + counts.intermediate) * tokens) if reference_forward else 0.0
    return Activations(saved=saved, backward=backward, reference=reference)


@dataclass
class PlanInputs:
    """What the plan needs, typed (``plan_inputs`` reads it from the composed config)."""

    model_name: str
    arch: dict[str, Any]
    model_dtype: str
    gradient_checkpointing: bool
    lora: LoraArgs | None
    hardware: HardwareArgs
    gpus: int
    gpu_memory_gib: float | None
    rows: int
    n_responses: int
    prompt_len: int
    response_len: int
    reference: str  # precompute | frozen | adapters_off
    overhead_gib: float = 2.0
    sample_batch: int = 64  # sequences per generation batch of the sampler (flat: prompts x samples)
    sample_new_tokens: int = 256
    eval_batch: int = 64
    eval_new_tokens: int = 32
    sampler_backend: str = "hf"  # what samples: hf | vllm (resolved from ``backend``, :func:`plan_backend`)
    backend_reason: str = ""
    vllm_utilization: float = 0.3  # vllm.gpu_memory_utilization
    vllm_eager: bool = False  # vllm.enforce_eager: no CUDA graphs
    vllm_graph_gib: float = 1.0  # plan.vllm_cuda_graph_gib: the CUDA graphs' pool, outside vLLM's share


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    counts: ModelCounts
    states: ModelStates
    reference_weights: float
    activations: Activations
    overhead: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.states.gpu + self.reference_weights + self.activations.peak + self.overhead

    @property
    def fits(self) -> bool | None:
        if self.inputs.gpu_memory_gib is None:
            return None
        return self.total <= self.inputs.gpu_memory_gib * GIB

    def record(self) -> dict[str, Any]:
        gib = lambda x: round(x / GIB, 3)  # noqa: E731
        return {"model": self.inputs.model_name, "strategy": self.inputs.hardware.name, "gpus": self.inputs.gpus,
                "params": self.counts.total, "trainable_params": self.counts.trainable,
                "largest_module_params": self.counts.largest_module,
                "per_gpu_gib": {"weights": gib(self.states.weights), "gradients": gib(self.states.gradients),
                                "optimizer": gib(self.states.optimizer), "gathered": gib(self.states.gathered),
                                "model_states": gib(self.states.gpu), "reference": gib(self.reference_weights),
                                "activations": gib(self.activations.peak), "overhead": gib(self.overhead),
                                "total": gib(self.total)},
                "cpu_offload_gib_per_gpu": gib(self.states.cpu), "gpu_memory_gib": self.inputs.gpu_memory_gib,
                "fits": self.fits}

    def table(self) -> str:
        i, s, a = self.inputs, self.states, self.activations
        t = i.prompt_len + i.n_responses * i.response_len
        rows = [
            ("weights", s.weights), ("gradients", s.gradients),
            ("optimizer states" + (" + fp32 master" if i.hardware.strategy == "deepspeed" else ""), s.optimizer),
            ("gathered parameters", s.gathered), ("reference model", self.reference_weights),
            ("activations (peak)", a.peak), ("  of which kept from forward", a.saved),
            ("allowance (context, buffers)", self.overhead),
        ]
        lora = f", LoRA r={i.lora.r} ({self.counts.trainable / 1e6:.1f}M trainable)" if i.lora else ""
        lines = [
            f"model {i.model_name}: {self.counts.total / 1e9:.3f}B parameters{lora}, {i.model_dtype}, "
            f"gradient checkpointing {'on' if i.gradient_checkpointing else 'off'}",
            f"hardware {i.hardware.name} ({i.hardware.strategy}"
            + (f", ZeRO-{i.hardware.zero_stage}" if i.hardware.strategy == "deepspeed" else "")
            + (", offload optimizer" if i.hardware.offload_optimizer else "")
            + (", offload parameters" if i.hardware.offload_parameters else "")
            + f") on {i.gpus} GPU(s), {i.hardware.precision}",
            f"batch: {i.rows} packed row(s) per GPU of {i.prompt_len} prompt + {i.n_responses} x {i.response_len} "
            f"response tokens = {t} tokens; reference: {i.reference}",
            "",
            f"{'per GPU':<32}{'GiB':>10}",
        ]
        lines += [f"{name:<32}{value / GIB:>10.2f}" for name, value in rows]
        lines.append(f"{'total':<32}{self.total / GIB:>10.2f}")
        if s.cpu:
            lines.append(f"{'CPU memory (offload), per GPU':<32}{s.cpu / GIB:>10.2f}")
        if self.fits is None:
            lines.append("fits: unknown (set hardware.gpu_memory_gib or +plan.gpu_memory_gib)")
        else:
            verdict = "yes" if self.fits else "NO"
            lines.append(f"fits: {verdict} ({self.total / GIB:.1f} of {i.gpu_memory_gib:g} GiB per GPU)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def plan_memory(inputs: PlanInputs) -> MemoryPlan:
    """The per-GPU memory plan for ``inputs`` (see the module docstring)."""
    hw = inputs.hardware
    counts = count_parameters(inputs.arch, inputs.lora)
    states = model_state_bytes(counts, hw, inputs.model_dtype, inputs.gpus)
    deepspeed = hw.strategy == "deepspeed"
    param_bytes = 2 if deepspeed else DTYPE_BYTES[inputs.model_dtype]
    sharded = (deepspeed and hw.zero_stage == 3) or hw.strategy == "fsdp"
    reference_weights = 0.0
    if inputs.reference == "frozen":
        reference_weights = param_bytes * counts.total / (inputs.gpus if sharded else 1)
    mixed = hw.precision.startswith(("bf16", "16"))
    act_bytes = 2 if (mixed or param_bytes == 2) else 4
    activations = activation_bytes(counts, inputs.rows, inputs.prompt_len, inputs.response_len,
                                   inputs.n_responses, act_bytes, inputs.gradient_checkpointing,
                                   reference_forward=inputs.reference in ("frozen", "adapters_off"),
                                   lora_dropout=bool(inputs.lora and inputs.lora.dropout > 0))
    notes = []
    if not deepspeed and hw.precision.endswith("-true") and param_bytes == 2 and inputs.lora is None:
        notes.append(f"hardware.precision={hw.precision}: pure 16-bit training, no fp32 master weights (most "
                     "updates at DPO learning rates round away); bf16-mixed keeps them (4 bytes per parameter)")
    return MemoryPlan(inputs, counts, states, reference_weights, activations, inputs.overhead_gib * GIB, notes)


PLAN_KEYS = ("gpus", "gpu_memory_gib", "n_responses", "prompt_len", "response_len", "overhead_gib",
             "vllm_cuda_graph_gib")


def plan_inputs(cfg) -> PlanInputs:
    """Read :class:`PlanInputs` from a composed ``conf/train.yaml`` (with optional ``plan.*`` keys)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=False)
    plan_cfg = dict(container.get("plan") or {})
    unknown = sorted(set(plan_cfg) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"plan.{unknown[0]}: unknown key (known: {', '.join(sorted(PLAN_KEYS))})")
    section = lambda key: OmegaConf.to_container(cfg[key], resolve=True) if key in cfg else {}  # noqa: E731
    hw = HardwareArgs(**section("hardware"))
    return make_inputs(section("model"), hw, str(cfg.loss.name), section("task"), section("train"),
                       section("eval"), section("sampler"), plan_cfg, backend=str(cfg.get("backend", "auto")),
                       vllm=section("vllm"))


def plan_backend(setting: str, hw: HardwareArgs, gpus: int) -> tuple[str, str]:
    """What will sample (``hf`` or ``vllm``) for ``backend=setting``, and why, as a run decides it
    (:func:`alignexp.sampling.vllm_backend.choose_backend`, :func:`alignexp.pipeline.sampling_backend`):
    several processes share the sampling with the HF engine; ``auto`` takes vLLM on one GPU where it is
    installed (here: the machine the plan runs on)."""
    import importlib.util

    if setting == "hf":
        return "hf", "backend=hf"
    if hw.accelerator == "cpu":
        return "hf", "on CPU the HF engine samples"
    if gpus > 1:
        return "hf", f"{gpus} processes share the sampling, so the HF engine samples"
    if setting == "vllm":
        return "vllm", "backend=vllm"
    if importlib.util.find_spec("vllm") is None:
        return "hf", "backend=auto and vllm is not installed here (where it is, plan with backend=vllm)"
    return "vllm", "backend=auto and vllm is installed"


def make_inputs(model: dict[str, Any], hw: HardwareArgs, loss_name: str, task: dict[str, Any], train: dict[str, Any],
                evaluation: dict[str, Any], sampler: dict[str, Any], plan_cfg: dict[str, Any], backend: str = "auto",
                vllm: dict[str, Any] | None = None) -> PlanInputs:
    """:class:`PlanInputs` from the sections of a run's config (plain mappings), ``plan.*`` settings, ``backend``
    and the ``vllm`` section."""
    from alignexp.losses import get_loss
    from alignexp.models.lora import lora_args

    arch = dict(model.get("arch") or {})
    if "vocab_size" not in arch:
        if model.get("path") is not None:
            raise ValueError(f"model.arch of model={model.get('name')} has no vocab_size: give the architecture "
                             f"(hidden_size, num_hidden_layers, vocab_size, ...) in conf/model/{model.get('name')}.yaml; "
                             "the plan downloads nothing")
        from alignexp.models.tokenizer import build_byte_tokenizer

        arch["vocab_size"] = len(build_byte_tokenizer())
    lora = lora_args(model.get("lora"))
    spec = get_loss(loss_name)
    if spec.listwise:
        n = task.get("ranking_length") or task.get("n_responses") or 4
    else:
        n = 2 if spec.min_responses >= 2 else 1
    n = int(plan_cfg.get("n_responses", n)) + int(spec.uses_target)
    reference = "none"
    if spec.needs_reference:
        reference = "adapters_off" if lora else str(train.get("reference", "precompute"))
    if reference not in ("none", "precompute", "frozen", "adapters_off"):
        raise ValueError(f"train.reference must be precompute or frozen, got {reference!r}")
    gpus = int(plan_cfg["gpus"]) if "gpus" in plan_cfg else hw.world_size
    memory = plan_cfg.get("gpu_memory_gib", hw.gpu_memory_gib)
    response_len = int(plan_cfg.get("response_len", model.get("max_response_len", 256)))
    sampler_backend, backend_reason = plan_backend(backend, hw, gpus)
    vllm = vllm or {}
    return PlanInputs(model_name=str(model.get("name")), arch=arch, model_dtype=str(model.get("dtype", "float32")),
                      gradient_checkpointing=bool(model.get("gradient_checkpointing", False)), lora=lora,
                      hardware=hw, gpus=gpus, gpu_memory_gib=None if memory is None else float(memory),
                      rows=int(train.get("batch_size", 16)), n_responses=n,
                      prompt_len=int(plan_cfg.get("prompt_len", model.get("max_prompt_len", 512))),
                      response_len=response_len, reference=reference,
                      overhead_gib=float(plan_cfg.get("overhead_gib", 2.0)),
                      sample_batch=int(sampler.get("batch_size") or 64),
                      sample_new_tokens=int(sampler.get("max_new_tokens") or response_len),
                      eval_batch=int(evaluation.get("batch_size", 64)),
                      eval_new_tokens=int(evaluation.get("max_new_tokens", 32)),
                      sampler_backend=sampler_backend, backend_reason=backend_reason,
                      vllm_utilization=float(vllm.get("gpu_memory_utilization", 0.3)),
                      vllm_eager=bool(vllm.get("enforce_eager", False)),
                      vllm_graph_gib=float(plan_cfg.get("vllm_cuda_graph_gib", 1.0)))
