"""``python -m alignexp.plan``: will this run fit? Per-GPU memory of a run, stage by stage, before renting GPUs.

Composes the same config as ``alignexp.train`` (model, loss, hardware, task, batch and sequence
settings; any override works: ``python -m alignexp.plan model=mistral7b hardware=deepspeed_zero3
hardware.devices=8 train.batch_size=2``) and prints, per GPU, the training stage in detail
(:mod:`alignexp.scale.plan_memory`):

* **model states**: weights, gradients and optimizer states (AdamW) as the chosen strategy lays them
  out: DeepSpeed ZeRO stage 1/2/3 (Rajbhandari et al. 2020, "ZeRO", section 3.1: mixed-precision Adam
  holds 2 + 2 + K bytes per parameter, 16-bit weights and gradients and K = 12 bytes of fp32 master
  weights, momentum and variance; DeepSpeed adds a 4-byte fp32 gradient partition; the stage decides
  what is partitioned over the data-parallel GPUs, see :func:`model_state_bytes`; with
  optimizer/parameter offload those bytes live in CPU memory), FSDP2 (fp32 master shards under mixed
  precision, a bf16 copy of the units being computed), DDP and one device (fp32 master weights,
  gradients and AdamW states for the trainable parameters under mixed precision, plus DDP's gradient
  buckets). With LoRA only the adapters have gradients and optimizer states (fp32, as PEFT keeps them).
* **reference**: none when reference log-probs are precomputed (``train.reference=precompute``, the
  cache: the reference waits in CPU memory while the policy trains) or when the reference is the LoRA
  policy with its adapters off; a frozen copy otherwise.
* **activations** of one micro-batch with shared-prefix packing (one row per prompt: the prompt once,
  then its n responses; ``alignexp.models.logprobs``): what autograd keeps per token and decoder
  layer (see :func:`activation_bytes`), only the layer inputs under gradient checkpointing, the
  (B, 1, T, T) block mask (boolean, and additive once), and the fp32 log-softmax over the vocabulary
  for response tokens only. Rows are counted as one per prompt (``train.batch_size`` rows of the
  longest block): the packer may put several short examples in one row, so this is an upper bound.
* an **allowance** for the CUDA context, the allocator's fragmentation and communication buffers
  (``plan.overhead_gib``, default 2 GiB: an assumption, not a measurement).

and then the **peak of every stage** (:mod:`alignexp.scale.plan_stages`): sampling, the reference
precompute, training, the gather after a sharded fit, evaluation. The run fits when its largest
stage does.

The model-state part agrees with DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``), checked in
``tests/unit/test_plan.py``; the activation formula is checked there against the bytes the packed
forward of a small GQA model keeps on CPU. Parameter counts come from ``model.arch`` (no download).

Plan-only settings, all optional: ``+plan.gpus=16`` (default: hardware.devices x hardware.num_nodes),
``+plan.gpu_memory_gib=80`` (default: hardware.gpu_memory_gib), ``+plan.n_responses=4``,
``+plan.prompt_len=1024``, ``+plan.response_len=512``, ``+plan.overhead_gib=2``, ``+plan.vllm_cuda_graph_gib=1``
(where vLLM samples: ``backend``, ``vllm.*``; see :mod:`alignexp.scale.plan_stages`).
Exit status 0 when it fits, 1 when it does not, 2 for a bad config.
"""

from alignexp.args import HardwareArgs
from alignexp.scale.plan_memory import (
    DTYPE_BYTES,
    GIB,
    Activations,
    MemoryPlan,
    ModelCounts,
    ModelStates,
    PlanInputs,
    activation_bytes,
    count_parameters,
    layer_bytes_per_token,
    make_inputs,
    model_state_bytes,
    plan_inputs,
    plan_memory,
)
from alignexp.scale.plan_stages import RunPlan, StagePeak, plan_for_run, plan_run, stage_peaks

__all__ = ["DTYPE_BYTES", "GIB", "Activations", "MemoryPlan", "ModelCounts", "ModelStates", "PlanInputs", "RunPlan",
           "StagePeak", "activation_bytes", "choose_multi_gpu", "count_parameters", "layer_bytes_per_token",
           "make_inputs", "model_state_bytes", "one_gpu", "plan_for_run", "plan_inputs", "plan_memory", "plan_run",
           "resolve_auto_inputs", "stage_peaks", "_main", "main"]


def one_gpu(hw: HardwareArgs) -> HardwareArgs:
    """The option ``hardware=auto`` starts from on GPUs: ``hw`` on one GPU, one process."""
    import dataclasses

    return dataclasses.replace(hw, name="gpu", accelerator="gpu", devices=1, strategy="auto", threads=None)


def choose_multi_gpu(gpu: HardwareArgs, gpus: int, memory: float | None, peak_gib=None) -> tuple[HardwareArgs, str]:
    """``hardware=auto`` on ``gpus`` GPUs of ``memory`` GiB (``gpu``: :func:`one_gpu`'s option): DDP where the
    run's planned peak (``peak_gib(option)``, GiB per GPU) fits, DeepSpeed ZeRO-3 where it does not; and why.
    Without a run to plan (``peak_gib`` or ``memory`` None), DDP. :func:`alignexp.scale.hardware.choose_auto` asks
    it on the machine, :func:`resolve_auto_inputs` for the GPUs the plan is told of."""
    import dataclasses

    ddp = dataclasses.replace(gpu, name="ddp", devices=gpus, strategy="ddp", gpu_memory_gib=memory)
    if peak_gib is None or memory is None:
        return ddp, f"{gpus} CUDA devices"
    total = peak_gib(ddp)
    if total <= memory:
        return ddp, f"{gpus} CUDA devices; the plan's peak under DDP is {total:.1f} of {memory:.0f} GiB per GPU"
    zero3 = dataclasses.replace(ddp, name="deepspeed_zero3", strategy="deepspeed", zero_stage=3)
    return zero3, (f"{gpus} CUDA devices; under DDP the plan's peak is {total:.1f} GiB per GPU, more than "
                   f"{memory:.0f}: ZeRO-3 ({peak_gib(zero3):.1f} GiB)")


def resolve_auto_inputs(inputs: PlanInputs) -> tuple[PlanInputs, str]:
    """``hardware=auto`` planned as it resolves on the GPUs the plan is told of (``hardware.devices`` x
    ``num_nodes`` or ``plan.gpus``, of ``plan.gpu_memory_gib``): one GPU, DDP where the run fits, ZeRO-3
    where it does not (:func:`choose_multi_gpu`, the rule a run applies on the machine);
    with the line that says so. Without the GPUs' memory, DDP is planned and the line says how to choose."""
    import dataclasses

    if inputs.hardware.name != "auto":
        return inputs, ""
    with_hw = lambda option: dataclasses.replace(inputs, hardware=option)  # noqa: E731
    gpu = one_gpu(inputs.hardware)
    if inputs.gpus == 1:
        return with_hw(gpu), "hardware=auto on 1 GPU: gpu (one process)"
    per_node = max(1, inputs.gpus // max(1, inputs.hardware.num_nodes))
    memory = inputs.gpu_memory_gib
    option, why = choose_multi_gpu(gpu, per_node, memory, lambda candidate: plan_run(with_hw(candidate)).peak_gib)
    if memory is None:
        return with_hw(option), ("hardware=auto: planned as DDP; give +plan.gpu_memory_gib=<GiB per GPU> to see "
                                 "whether it chooses DDP or ZeRO-3")
    return with_hw(option), f"hardware=auto: {option.name} ({why})"


def main() -> None:
    """The Hydra entry point (``conf/train.yaml``); writes no run folder or log file."""
    import sys

    import hydra

    from alignexp.config import CONF_DIR

    defaults = {"hydra.run.dir": ".", "hydra.output_subdir": "null", "hydra/job_logging": "disabled",
                "hydra/hydra_logging": "disabled"}
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in sys.argv[1:] if "=" in arg}
    sys.argv += [f"{key}={value}" for key, value in defaults.items() if key not in given]
    hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")(_main)()


def _main(cfg) -> None:
    """Print the plan of a composed config; exit 1 when it does not fit, 2 for a bad config."""
    import json
    import sys

    try:
        inputs, chosen = resolve_auto_inputs(plan_inputs(cfg))
        plan = plan_run(inputs)
    except ValueError as error:
        print(f"config error: {error}", file=sys.stderr)
        sys.exit(2)
    if chosen:
        print(chosen)
    print(plan.table())
    print(json.dumps(plan.record()))
    if plan.fits is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
