"""Typed arguments: one dataclass per config section, each checking itself, so every bound is written once.

:func:`alignexp.config.validate` builds a :class:`RunArgs` from the composed config; below the entry
points every function takes these, never a ``DictConfig``. A bad value raises
:class:`~alignexp.errors.ConfigError` naming the key (``train.lr must be > 0, got -1``). This module
imports no Hydra, OmegaConf or torch, so the GPU check can use it anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from alignexp.errors import AlignexpError, ConfigError

A = TypeVar("A")


def from_mapping(cls: type[A], values: Mapping[str, Any] | None, section: str, **overrides: Any) -> A:
    """``cls(**values, **overrides)``; a key that is not a field raises ConfigError naming ``section.key``."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    return cls(**{**values, **overrides})


def instantiate_target(config: Mapping[str, Any], key: str, **kwargs: Any) -> Any:
    """Build the ``_target_`` of ``config`` (a plain mapping) with ``kwargs``; errors name ``key``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if "_target_" not in config:
        raise ConfigError(f"{key}: no _target_ (the class to build); choose an option of the {key} group")
    try:
        return instantiate(dict(config), **kwargs, _recursive_=False, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, AlignexpError):  # it names its key, file or model already
            raise cause from None
        reason = cause if isinstance(cause, (ValueError, TypeError)) else error
        hint = ""
        if isinstance(cause, ImportError) or "Error locating target" in str(error):
            hint = (f"; the module of {key}._target_={config['_target_']} must be importable: add it to imports=[...] "
                    "and make it importable from the working folder or PYTHONPATH")
        raise ConfigError(f"{key}: {reason}{hint}") from None


def _fail(key: str, requirement: str, value: Any) -> None:
    raise ConfigError(f"{key} must be {requirement}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, optional: bool = False) -> None:
    """Raise ConfigError unless ``value`` is a (finite, integer) number in the given range."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if not (_is_int(value) if integer else _is_number(value)):
        _fail(key, kind, value)
    if low is not None and (value < low or (low_open and value == low)):
        _fail(key, f"{'>' if low_open else '>='} {low:g}", value)
    if high is not None and value > high:
        _fail(key, f"<= {high:g}", value)


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(key, "true or false", value)


def check_choice(key: str, value: Any, options: Sequence[Any]) -> None:
    if value not in options:
        _fail(key, f"one of {', '.join(map(str, options))}", value)


# -- model and hardware --------------------------------------------------------------------------------
@dataclass
class LoraArgs:
    """``model.lora``: rank ``r``, scale ``alpha`` (the update is scaled by alpha / r), ``dropout`` on the
    adapter's input, and ``target_modules``: module names (``q_proj``, ...) or ``all-linear``."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    enabled: bool = True

    def __post_init__(self) -> None:
        check_number("model.lora.r", self.r, low=1, integer=True)
        check_number("model.lora.alpha", self.alpha, low=0, low_open=True)
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            _fail("model.lora.dropout", "in [0, 1)", self.dropout)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                _fail("model.lora.target_modules", "a list of module names or 'all-linear'", self.target_modules)
        else:
            self.target_modules = [str(name) for name in self.target_modules]
            if not self.target_modules:
                raise ConfigError("model.lora.target_modules is empty")


def lora_args(config: Mapping[str, Any] | None) -> LoraArgs | None:
    """``model.lora`` as :class:`LoraArgs`; None when it is null or has ``enabled: false``."""
    if config is None:
        return None
    args = from_mapping(LoraArgs, config, "model.lora")
    return args if args.enabled else None


DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


BUILT_PRESET = "tiny"
"""The default ``model`` preset: a model built from its ``arch``, which says nothing of a ``model.path``."""


def model_name(path: str | Path) -> str:
    """How a model loaded from ``path`` is named (logs, eval.json, cache folders): a local folder's name, or
    the hub id."""
    text = str(path).rstrip("/")
    local = Path(text).expanduser()
    if text.startswith((".", "/", "~")) or local.exists():
        return local.resolve().name or text
    return text


@dataclass
class ModelArgs:
    """``model``: ``path`` is a hub id or a local folder; None builds the model from ``arch``. ``asset``: the
    offline asset (:mod:`alignexp.assets`) read instead of the hub id ``path`` where the hub is unreachable."""

    name: str = "tiny"
    path: str | None = None
    asset: str | None = None
    arch: dict = field(default_factory=dict)
    init_seed: int = 0
    dtype: str = "float32"
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False
    max_prompt_len: int = 512
    max_response_len: int = 256
    lora: dict | None = None
    parity_probe: bool = True

    def __post_init__(self) -> None:
        check_choice("model.dtype", self.dtype, DTYPE_NAMES)
        check_bool("model.gradient_checkpointing", self.gradient_checkpointing)
        check_bool("model.parity_probe", self.parity_probe)
        if self.path is not None and self.name == BUILT_PRESET:
            # model.path= over the default preset: the preset's arch describes the model it builds, not this
            # checkpoint (whose own config.json is read); the model is named by its folder or hub id
            self.name, self.arch = model_name(self.path), {}
        for key in ("max_prompt_len", "max_response_len"):
            check_number(f"model.{key}", getattr(self, key), low=1, integer=True)
        self.arch = dict(self.arch or {})
        self.lora = dict(self.lora) if self.lora is not None else None
        lora_args(self.lora)  # checks model.lora's keys and values

    def with_path(self, path: str | Path | None) -> ModelArgs:
        """The same settings for the weights at ``path``."""
        return dataclasses.replace(self, path=None if path is None else str(path))

    @property
    def lora_args(self) -> LoraArgs | None:
        return lora_args(self.lora)


STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP")  # FSDP2: parameters resharded after forward, or kept


@dataclass
class HardwareArgs:
    """``hardware``: ``devices`` per node (an int, ``auto``, or a list of device indices), ``num_nodes``,
    ``strategy`` (one of :data:`STRATEGIES`). DeepSpeed: ``zero_stage``, ``offload_optimizer``,
    ``offload_parameters`` (stage 3 only). FSDP: ``sharding_strategy``, ``activation_checkpointing``,
    ``cpu_offload``, ``wrap_layers`` (decoder-layer class names; None: the model's ``_no_split_modules``).
    ``process_group_backend`` (None: NCCL on GPU, Gloo on CPU), ``find_unused_parameters`` (DDP),
    ``threads`` (intra-op CPU threads), ``gpu_memory_gib`` (read by ``python -m alignexp.plan``),
    ``zero_persistence_threshold`` (ZeRO-3 leaves parameters smaller than this unpartitioned; None:
    DeepSpeed's default). ``name: auto`` is resolved to another option at start
    (:func:`alignexp.scale.hardware.resolve_auto`)."""

    name: str = "cpu"
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    precision: str = "32-true"
    strategy: Any = "auto"
    threads: int | None = None
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_parameters: bool = False
    sharding_strategy: str = "FULL_SHARD"
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    wrap_layers: list[str] | None = None
    process_group_backend: str | None = None
    find_unused_parameters: bool = False
    gpu_memory_gib: float | None = None
    zero_persistence_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.wrap_layers is not None:
            self.wrap_layers = [str(name) for name in self.wrap_layers]
        if not isinstance(self.devices, (int, str)):  # a list of device indices
            self.devices = [int(d) for d in self.devices]
        if isinstance(self.strategy, str):
            check_choice("hardware.strategy", self.strategy, STRATEGIES)
        self.precision = str(self.precision)
        check_choice("hardware.precision", self.precision, PRECISIONS)
        if isinstance(self.devices, str) and self.devices != "auto":
            _fail("hardware.devices", "a number, 'auto' or a list of indices", self.devices)
        if isinstance(self.devices, int) and (self.devices == 0 or self.devices < -1):
            _fail("hardware.devices", ">= 1 (or -1 / 'auto' for all)", self.devices)
        check_number("hardware.num_nodes", self.num_nodes, low=1, integer=True)
        check_number("hardware.threads", self.threads, low=1, integer=True, optional=True)
        if self.strategy == "deepspeed":
            check_choice("hardware.zero_stage", self.zero_stage, (1, 2, 3))
            if self.offload_parameters and self.zero_stage != 3:
                raise ConfigError("hardware.offload_parameters needs hardware.zero_stage=3 (ZeRO-Infinity offloads "
                                  f"parameters only in stage 3), got zero_stage={self.zero_stage}")
        elif self.zero_stage is not None or self.offload_optimizer or self.offload_parameters:
            raise ConfigError(f"hardware.zero_stage / offload_optimizer / offload_parameters are DeepSpeed settings; "
                              f"hardware.strategy is {self.strategy!r} (use hardware=deepspeed_zero2|deepspeed_zero3|...)")
        check_choice("hardware.sharding_strategy", self.sharding_strategy, SHARDING_STRATEGIES)
        check_number("hardware.zero_persistence_threshold", self.zero_persistence_threshold, low=0, integer=True,
                     optional=True)
        check_number("hardware.gpu_memory_gib", self.gpu_memory_gib, low=0, low_open=True, optional=True)

    @property
    def device_type(self) -> str:
        return "cuda" if self.accelerator in ("gpu", "cuda") else self.accelerator

    @property
    def torch_device(self) -> str:
        """Where this process's models live outside Lightning's fit (sampling, reference log-probs,
        evaluation): the GPU of its local rank, or the CPU."""
        import torch

        from alignexp.distributed import local_rank

        return f"cuda:{local_rank()}" if self.device_type == "cuda" and torch.cuda.is_available() else "cpu"

    @property
    def world_size(self) -> int:
        """Processes in the run: devices per node times nodes. Needs a definite ``devices``."""
        if isinstance(self.devices, list):
            return len(self.devices) * self.num_nodes
        if not isinstance(self.devices, int) or self.devices < 1:
            raise ConfigError(f"hardware.devices={self.devices!r}: give the number of devices per node "
                              f"(e.g. hardware.devices=8)")
        return self.devices * self.num_nodes


# -- training --------------------------------------------------------------------------------------------
@dataclass
class OptimArgs:
    """AdamW with a linear warmup (:func:`alignexp.lightning_modules.optim.adamw_with_warmup`)."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)


REFERENCE_MODES = ("precompute", "frozen")


@dataclass
class TrainArgs:
    """``train``: the schedule of every training stage (preference, reward model, PPO's optimiser).
    ``reference``: the reference's log-probs precomputed and cached (default), or a frozen copy.
    ``disable_dropout``: the backbone's dropout off while training (as the DPO reference code and TRL do;
    PPO always has it off); ``keep_lora_dropout``: except LoRA's own (``model.lora.dropout``).
    ``batch_size`` is per device; ``global_batch_size`` (optional) sets ``accumulate_grad_batches`` so that
    batch_size x devices x nodes x accumulation equals it. ``checkpoint_every``: a checkpoint every that many
    optimizer steps (0: none; a SLURM preemption signal still saves one), from which ``resume=`` continues."""

    batch_size: int = 16
    accumulate_grad_batches: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_epochs: int = 2
    max_steps: int = -1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    reference: str = "precompute"
    disable_dropout: bool = True
    keep_lora_dropout: bool = False
    global_batch_size: int | None = None
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        check_number("train.global_batch_size", self.global_batch_size, low=1, integer=True, optional=True)
        check_number("train.checkpoint_every", self.checkpoint_every, low=0, integer=True)
        check_bool("train.disable_dropout", self.disable_dropout)
        check_bool("train.keep_lora_dropout", self.keep_lora_dropout)
        for key in ("batch_size", "accumulate_grad_batches", "max_epochs", "log_every_n_steps"):
            check_number(f"train.{key}", getattr(self, key), low=1, integer=True)
        check_number("train.lr", self.lr, low=0, low_open=True)
        check_number("train.weight_decay", self.weight_decay, low=0)
        check_number("train.warmup_steps", self.warmup_steps, low=0, integer=True)
        check_number("train.max_steps", self.max_steps, low=-1, integer=True)
        check_number("train.gradient_clip_val", self.gradient_clip_val, low=0, optional=True)
        check_choice("train.reference", self.reference, REFERENCE_MODES)

    @property
    def optim(self) -> OptimArgs:
        return OptimArgs(lr=self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps)


@dataclass
class SFTArgs:
    """``sft``: the schedule of the task's own SFT policy (trained once and cached). Its own ``seed`` (data
    order) is in the cache key, so a sweep over the run's ``seed`` shares one SFT policy on purpose.
    ``batch_size`` is the global batch (split over the ranks), so the cached policy does not depend on how
    many processes trained it."""

    batch_size: int = 64
    lr: float = 3e-3
    max_epochs: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("sft.seed", self.seed, integer=True)
        check_number("sft.batch_size", self.batch_size, low=1, integer=True)
        check_number("sft.max_epochs", self.max_epochs, low=1, integer=True)
        check_number("sft.lr", self.lr, low=0, low_open=True)


@dataclass
class RewardModelArgs:
    """``reward_model``: the share of rankings held out to measure a trained reward model's accuracy."""

    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not _is_number(self.heldout_fraction) or not 0 <= self.heldout_fraction < 1:
            _fail("reward_model.heldout_fraction", "in [0, 1)", self.heldout_fraction)


VALUE_MODELS = ("head", "critic")


@dataclass
class PPOArgs:
    """``ppo``: rollouts, the KL controller, the value model, safety nets and checkpoints of the PPO stage
    (the clipped loss's own hyper-parameters are ``loss.*``; the optimiser is ``train.*``'s; the
    reference is the run's: a frozen copy, or the LoRA policy with its adapters off). ``judge``: where
    r(x, y) comes from (a ``judge`` group option: gold, or reward_model with its path)."""

    kl_coef: float = 0.1
    adaptive_kl: bool = True
    target_kl: float = 6.0
    horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    rollout_batch_size: int = 64
    ppo_epochs: int = 4
    n_minibatches: int = 4
    steps: int = 60
    temperature: float = 1.0
    max_new_tokens: int = 32
    judge: dict = field(default_factory=lambda: {"name": "auto"})
    value_model: str = "head"
    max_kl: float = 100.0
    checkpoint_every: int = 10
    resume_from: str | None = None

    def __post_init__(self) -> None:
        for key in ("target_kl", "temperature", "max_kl"):
            check_number(f"ppo.{key}", getattr(self, key), low=0, low_open=True)
        check_number("ppo.kl_coef", self.kl_coef, low=0)
        for key in ("gamma", "lam"):
            check_number(f"ppo.{key}", getattr(self, key), low=0, high=1)
        for key in ("horizon", "rollout_batch_size", "ppo_epochs", "n_minibatches", "steps", "max_new_tokens"):
            check_number(f"ppo.{key}", getattr(self, key), low=1, integer=True)
        check_number("ppo.checkpoint_every", self.checkpoint_every, low=0, integer=True)
        if self.n_minibatches > self.rollout_batch_size:
            _fail("ppo.n_minibatches", f"<= ppo.rollout_batch_size ({self.rollout_batch_size})", self.n_minibatches)
        for key in ("adaptive_kl", "whiten_advantages"):
            check_bool(f"ppo.{key}", getattr(self, key))
        check_choice("ppo.value_model", self.value_model, VALUE_MODELS)
        self.judge = dict(self.judge or {"name": "auto"})
        if self.resume_from is not None and not Path(self.resume_from).is_file():
            raise ConfigError(f"ppo.resume_from={self.resume_from}: no such checkpoint file")


# -- evaluation -------------------------------------------------------------------------------------------
BASELINES = ("auto", "reference", "dataset")


@dataclass
class EvalArgs:
    """``eval`` (what ``conf/eval/*.yaml`` gives; ``max_prompt_len`` comes from the model, ``beta`` from
    the loss). See docs/evaluation.md for every metric.

    temperatures: sampling temperatures (0 = greedy); the DPO paper's sweep is 0, 0.25, ..., 1.
    baseline: the win rate's baseline: ``reference`` samples, the ``dataset``'s reference responses, or
    ``auto`` (reference samples on tasks with a gold reward, the dataset elsewhere).
    reference_metrics: BLEU/chrF/TER/ROUGE against the references: true, false or ``auto`` (tasks
    without a gold reward). bootstrap: resamples for 95% intervals of the corpus metrics.
    preference_accuracy / preference_split / max_preference_examples: implicit-reward accuracy on
    held-out rankings. best_of_n: N values for best-of-N from the reference. n_examples: sample texts
    kept per temperature. progress: tqdm bars.
    """

    enabled: bool = True
    temperatures: Sequence[float] = (1.0,)
    max_new_tokens: int = 32
    batch_size: int = 64
    seed: int = 1234
    max_prompt_len: int = 512
    baseline: str = "auto"
    reference_metrics: bool | str = "auto"
    bootstrap: int = 0
    preference_accuracy: bool = True
    preference_split: str | None = None
    max_preference_examples: int | None = 256
    beta: float = 1.0
    best_of_n: Sequence[int] = ()
    n_examples: int = 5
    progress: bool = True

    def __post_init__(self) -> None:
        self.temperatures = list(self.temperatures)
        self.best_of_n = list(self.best_of_n or ())
        if not self.temperatures:
            raise ConfigError("eval.temperatures: give at least one temperature")
        for t in self.temperatures:
            check_number("eval.temperatures", t, low=0)
        check_choice("eval.baseline", self.baseline, BASELINES)
        check_choice("eval.reference_metrics", self.reference_metrics, (True, False, "auto"))
        for n in self.best_of_n:
            check_number("eval.best_of_n", n, low=1, integer=True)
        for key in ("max_new_tokens", "batch_size"):
            check_number(f"eval.{key}", getattr(self, key), low=1, integer=True)
        check_number("eval.max_preference_examples", self.max_preference_examples, low=1, integer=True,
                     optional=True)
        check_number("eval.bootstrap", self.bootstrap, low=0, integer=True)
        check_number("eval.beta", self.beta, low=0, low_open=True)


@dataclass
class VllmArgs:
    """``vllm``: the vLLM engine, where it samples (``backend``; :mod:`alignexp.sampling.vllm_backend`).

    gpu_memory_utilization: the share of the GPU's memory vLLM takes while it samples, for its weights,
    activations and KV cache (it starts only where that much is free; it sleeps during training, weights
    in host memory and KV cache freed). enforce_eager: no CUDA graphs (slower decoding; the graphs' memory,
    outside that share, is saved). max_model_len: the longest prompt + response its KV cache is planned for
    (None: the model's context length). ``python -m alignexp.plan`` counts all three.
    """

    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = False
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        check_number("vllm.gpu_memory_utilization", self.gpu_memory_utilization, low=0.0, high=1.0, low_open=True)
        check_number("vllm.max_model_len", self.max_model_len, low=1, integer=True, optional=True)

    def engine_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~alignexp.sampling.vllm_backend.VLLMBackend` these settings give."""
        options: dict[str, Any] = {"gpu_memory_utilization": self.gpu_memory_utilization,
                                   "enforce_eager": self.enforce_eager}
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        return options


# -- the whole run ---------------------------------------------------------------------------------------
PAIR_STRATEGIES = ("best_worst", "adjacent", "all", "first_round", "tournament")


@dataclass
class LossArgs:
    """``loss``: the registered loss ``name`` and its hyper-parameters (checked against its signature)."""

    name: str
    hparams: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


@dataclass
class RunArgs:
    """Everything a training run reads, typed and checked (built by :func:`alignexp.config.validate`)."""

    model: ModelArgs
    hardware: HardwareArgs
    loss: LossArgs
    train: TrainArgs
    sft: SFTArgs
    eval: EvalArgs
    ppo: PPOArgs
    reward_model: RewardModelArgs
    task: dict
    sampler: dict
    judge: dict
    logger: dict
    output_dir: Path
    cache_dir: Path
    seed: int = 0
    pairs: str = "best_worst"
    binary: str | float = "best"
    init_from: str | None = None
    run_name: str = "run"
    imports: list[str] = field(default_factory=list)
    resume: str | None = None
    backend: str = "auto"
    vllm: VllmArgs = field(default_factory=VllmArgs)

    def __post_init__(self) -> None:
        check_number("seed", self.seed, integer=True)
        check_choice("pairs", self.pairs, PAIR_STRATEGIES)
        if self.binary != "best" and (isinstance(self.binary, bool) or not isinstance(self.binary, (int, float))):
            raise ConfigError(f"binary must be best or a number (a score threshold), got {self.binary!r}")
        check_choice("backend", self.backend, ("auto", "hf", "vllm"))
        self.output_dir, self.cache_dir = Path(self.output_dir), Path(self.cache_dir)
