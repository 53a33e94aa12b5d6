"""Which weights and tokenizer a run loads, decided in one place for train, sample and evaluate.

The policy starts from, in order: the weights named explicitly (``init_from``, ``policy=``), the
backbone ``model.path``, the task's own SFT policy (where the task trains one and the run wants one:
trained and cached when missing, :func:`ensure_sft_policy`), or a model built from ``model.arch``. A task
whose SFT starts from the pretrained backbone (``sft_from_backbone``, the imdb task) puts its SFT policy
before ``model.path``: ``model.path`` is then the backbone the SFT policy is fine-tuned from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from alignexp.args import HardwareArgs, ModelArgs, OptimArgs, RunArgs
from alignexp.distributed import is_main, shared_cache, world_size
from alignexp.errors import ConfigError
from alignexp.files import atomic_folder, code_keyed, digest
from alignexp.inputs import ModelUnavailable, check_model_source, check_writable
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.pipeline.context import RunContext
from alignexp.tasks.base import Task
from alignexp.tasks.loading import NoExamples

log = logging.getLogger(__name__)

# The modules (besides the task's own) whose code shapes a cached SFT policy: a change to one rebuilds it.
SFT_CODE = ("alignexp.lightning_modules.sft", "alignexp.lightning_modules.optim", "alignexp.lightning_modules.datamodule", "alignexp.models.backbone",
            "alignexp.models.tokenizer", "alignexp.models.logprobs", "alignexp.models.attention",
            "alignexp.pipeline.weights")


def resolve_weights(explicit: str | None, model: ModelArgs, task: Task, wants_sft_policy: bool,
                    sft_policy: Callable[[], Path]) -> str | None:
    """The folder or hub id to load (None: build from ``model.arch``); see the module docstring."""
    if explicit:
        return str(explicit)
    if wants_sft_policy and task.trains_sft_policy and getattr(task, "sft_from_backbone", False):
        return str(sft_policy())
    if model.path:
        return str(model.path)
    if wants_sft_policy and task.trains_sft_policy:
        return str(sft_policy())
    return None


def check_weights_source(args: RunArgs, task: Task, explicit: str | None, explicit_key: str,
                         wants_sft_policy: bool) -> str | None:
    """Before any model is built: the weights :func:`resolve_weights` will pick, checked without loading
    them (a folder that holds a model, a hub id that exists), or, where the task's SFT policy is not
    cached yet, its demonstrations and the cache folder it will be saved in. Returns what it resolved."""
    init = resolve_weights(explicit, args.model, task, wants_sft_policy, lambda: sft_policy_folder(args, task))
    if args.model.path and init is not None and not explicit and init != str(args.model.path):
        _check_backbone(args.model)  # the backbone the SFT policy starts from
    if explicit:
        check_model_source(str(init), explicit_key)
    elif args.model.path and init == str(args.model.path):
        _check_backbone(args.model)
    elif init is not None and not (Path(init) / "config.json").exists():  # the SFT policy is trained first
        check_writable(args.cache_dir, "paths.cache_dir")
        if not task.sft_examples("train"):  # a record task raises NoExamples itself, naming its filters
            raise NoExamples(f"task '{task.name}' has no SFT demonstrations to train its SFT policy on")
    return init


def _check_backbone(model: ModelArgs) -> None:
    """``model.path`` holds a model; where it is a hub id with an offline asset, the error says both ways."""
    try:
        check_model_source(str(model.path), "model.path")
    except ModelUnavailable as error:
        if not model.asset:
            raise
        from alignexp.assets import how_to_get

        raise ModelUnavailable(f"{error} Or, offline: {how_to_get(None, model.asset, 'model.path')}.") from None


def check_weights(ctx: RunContext) -> None:
    """The ``weights`` stage's check: what the policy will start from (``ctx.init`` is set to it)."""
    ctx.init = check_weights_source(ctx.args, ctx.task, ctx.args.init_from, "init_from",
                                    ctx.spec.data != "demonstrations")


def load_model(model: ModelArgs, tokenizer, hw: HardwareArgs, *, frozen: bool = False):
    """The causal LM for ``model`` (its ``path``, or built from ``arch``) on this rank's device."""
    built = build_model(model, tokenizer, hw.device_type)
    if frozen:
        built.requires_grad_(False).eval()
    return built.to(hw.torch_device)


def sft_policy_folder(args: RunArgs, task: Task) -> Path:
    """Where the task's SFT policy for this model and schedule is cached (keyed by what it depends on)."""
    model = {k: v for k, v in dataclasses.asdict(args.model).items() if k != "lora"}  # LoRA applies after it
    key = digest(model, task.sft_key(), dataclasses.asdict(args.sft))
    return code_keyed(args.cache_dir / "sft" / f"{task.name}-{args.model.name}-{key}", (type(task).__module__, *SFT_CODE))


def per_device_batch(global_batch: int, key: str) -> int:
    """A global batch split over the ranks (it must divide)."""
    if global_batch % world_size():
        raise ConfigError(f"{key}={global_batch} is a global batch and does not split over {world_size()} processes")
    return global_batch // world_size()


def ensure_sft_policy(args: RunArgs, task: Task) -> Path:
    """The task's SFT policy, trained on its demonstrations when not cached yet; its folder is returned.

    Every rank calls it: when the folder is missing, all ranks train it together and rank 0 writes it,
    holding the cache entry's lock meanwhile, so a concurrent job waits for it instead of training it too
    (:func:`alignexp.distributed.shared_cache`)."""
    from alignexp.lightning_modules.datamodule import RankingDataset, encode_all, make_loader
    from alignexp.lightning_modules.sft import SFTModule
    from alignexp.pipeline.fit import fit, write_policy

    folder = sft_policy_folder(args, task)
    # The task's SFT starts from the pretrained backbone where the task says so, else from model.arch.
    base = args.model if getattr(task, "sft_from_backbone", False) else dataclasses.replace(args.model, path=None)
    tokenizer = build_tokenizer(base)

    def train():
        if is_main():
            print(f"[alignexp] no SFT policy for this task and model yet: training one (cached at {folder})",
                  flush=True)
        start = time.time()
        model = build_model(base, tokenizer, args.hardware.device_type)
        encoded = encode_all(tokenizer, task.sft_examples("train"), base.max_prompt_len, base.max_response_len)
        loader = make_loader(RankingDataset(encoded), per_device_batch(args.sft.batch_size, "sft.batch_size"),
                             tokenizer.pad_token_id, shuffle=True, seed=args.sft.seed)
        module = SFTModule(model, OptimArgs(lr=args.sft.lr, warmup_steps=args.train.warmup_steps))
        fit(module, loader, hw=args.hardware, logger=args.logger, out=folder.parent / f".{folder.name}-logs",
            stage="sft", max_epochs=args.sft.max_epochs, log_every_n_steps=args.train.log_every_n_steps,
            checkpoint_every=args.train.checkpoint_every)
        log.info("SFT policy: trained in %.1fs", time.time() - start)
        return module.policy

    def save(model, target: Path) -> None:
        with atomic_folder(target) as tmp:
            write_policy(model, tokenizer, tmp)

    def cached(found: Path) -> Path:
        log.info("SFT policy: cached at %s", found)
        return found

    shared_cache(folder, train, save, cached, exists=lambda path: (path / "config.json").exists(), what="SFT policy")
    return folder
