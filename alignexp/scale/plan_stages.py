"""Per-stage peaks of a run: what sits on each GPU while each stage of the pipeline runs (alignexp/pipeline/).

Every rank holds what is listed (the stages shard work over ranks, not weights, outside the fit):

* ``sampling``: the policy and the reference (a frozen copy, or none for LoRA's adapters-off
  reference) in the model's dtype, and one generation batch (``sampler.batch_size`` sequences): its
  KV cache over prompt + new tokens, the prefill's logits over the prompt (the engine's forward keeps
  them for every position) and its layer transients, and the last step's fp32 logits.
* ``reference log-probs``: both models, and a no-grad forward of ``train.batch_size`` packed rows
  (:func:`~alignexp.scale.plan_memory.activation_bytes`' reference transients).
* ``training``: the model states of the strategy, the activations' peak, and the reference: none when
  its log-probs are precomputed (it waits in CPU memory), a (sharded) copy for
  ``train.reference=frozen``. Before the strategy shards it, each rank holds the whole policy once
  (fp32 under FSDP2's mixed precision): the setup peak, counted when it is higher.
* ``gather`` (ZeRO-3, FSDP2): when training ends the trained weights are gathered, one parameter at a
  time, into a whole copy in the model's dtype on every rank, beside the sharded states.
* ``evaluation``: both models again, and the larger of a generation batch (``eval.batch_size``) and
  the no-grad log-prob forward of ``eval.batch_size`` samples (the KL estimate).

Each stage adds the same allowance as the training plan (``plan.overhead_gib``).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignexp.scale.plan_memory import DTYPE_BYTES, GIB, MemoryPlan, activation_bytes


@dataclass
class StagePeak:
    """One stage's bytes per GPU, by part."""

    name: str
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def generation_bytes(plan: MemoryPlan, sequences: int, prompt_len: int, new_tokens: int) -> float:
    """One generation batch: KV cache (2 x layers x kv heads x head dim per token, model dtype), the
    prefill's logits (sequences x prompt x vocab, model dtype) and layer transients (the widest
    activations of one layer over the prompt, x4), and the last step's logits in fp32 (x3: logits,
    log-softmax, probabilities)."""
    c, p = plan.counts, DTYPE_BYTES[plan.inputs.model_dtype]
    kv = 2 * c.n_layers * c.kv_heads * c.head_dim * p * sequences * (prompt_len + new_tokens)
    prefill = sequences * prompt_len * (c.vocab * p + 4 * p * (c.hidden + c.intermediate))
    return kv + prefill + 3 * 4 * sequences * c.vocab


def stage_peaks(plan: MemoryPlan) -> list[StagePeak]:
    """The per-stage peaks of ``plan``'s run (see the module docstring)."""
    i, c, hw = plan.inputs, plan.counts, plan.inputs.hardware
    p = DTYPE_BYTES[i.model_dtype]
    adapters = 4.0 * c.trainable if i.lora else 0.0
    weights = {"policy": p * c.total + adapters,
               "reference": p * c.total if i.reference in ("precompute", "frozen") else 0.0}
    overhead = {"allowance": plan.overhead}
    sample_prompts = max(1, i.sample_batch)
    peaks = [StagePeak("sampling", {**weights, "generation": generation_bytes(
        plan, sample_prompts, i.prompt_len, i.sample_new_tokens), **overhead})]
    if i.reference == "precompute":
        forward = activation_bytes(c, i.rows, i.prompt_len, i.response_len, i.n_responses, p,
                                   checkpointing=False, reference_forward=True).reference
        peaks.append(StagePeak("reference log-probs", {**weights, "forward": forward, **overhead}))
    steady = {"model states": plan.states.gpu, "reference": plan.reference_weights,
              "activations": plan.activations.peak, **overhead}
    sharded = hw.strategy == "fsdp" or (hw.strategy == "deepspeed" and hw.zero_stage == 3)
    if sharded:
        master = 4 if hw.strategy == "fsdp" and hw.precision.endswith("-mixed") else p
        setup = {"whole policy before sharding": master * c.total + adapters, **overhead}
        peaks.append(StagePeak("training", steady if sum(steady.values()) >= sum(setup.values()) else setup))
        peaks.append(StagePeak("gather", {"model states": plan.states.gpu, "reference": plan.reference_weights,
                                          "whole trained policy": p * c.total + adapters, **overhead}))
    else:
        peaks.append(StagePeak("training", steady))
    eval_generation = generation_bytes(plan, i.eval_batch, i.prompt_len, i.eval_new_tokens)
    eval_logps = activation_bytes(c, i.eval_batch, i.prompt_len, i.eval_new_tokens, 1, p, checkpointing=False,
                                  reference_forward=True).reference
    peaks.append(StagePeak("evaluation", {**weights, "generation or log-probs": max(eval_generation, eval_logps),
                                          **overhead}))
    return peaks


def stage_table(peaks: list[StagePeak]) -> str:
    """The per-stage peaks as printed lines, the largest part of each named."""
    lines = [f"{'per-stage peak, per GPU':<32}{'GiB':>10}   largest part"]
    for peak in peaks:
        part, value = max(peak.parts.items(), key=lambda kv: kv[1])
        lines.append(f"{peak.name:<32}{peak.total / GIB:>10.2f}   {part} {value / GIB:.2f}")
    return "\n".join(lines)


@dataclass
class RunPlan:
    """The training plan of a run (:class:`~alignexp.scale.plan_memory.MemoryPlan`) and its per-stage peaks; the run
    fits when its largest stage does."""

    training: MemoryPlan
    peaks: list[StagePeak]

    @property
    def peak_gib(self) -> float:
        return max(stage.total for stage in self.peaks) / GIB

    @property
    def fits(self) -> bool | None:
        memory = self.training.inputs.gpu_memory_gib
        return None if memory is None else self.peak_gib <= memory

    def table(self) -> str:
        lines = [self.training.table(), "", stage_table(self.peaks)]
        if self.fits is not None:
            worst = max(self.peaks, key=lambda stage: stage.total)
            lines.append(f"run fits: {'yes' if self.fits else 'NO'} (largest stage: {worst.name}, "
                         f"{self.peak_gib:.1f} of {self.training.inputs.gpu_memory_gib:g} GiB per GPU)")
        return "\n".join(lines)

    def record(self) -> dict:
        return {**self.training.record(), "stages_gib": {s.name: round(s.total / GIB, 3) for s in self.peaks},
                "peak_gib": round(self.peak_gib, 3), "run_fits": self.fits}


def plan_run(inputs) -> RunPlan:
    """The training plan and the per-stage peaks for :class:`~alignexp.scale.plan_memory.PlanInputs`."""
    from alignexp.scale.plan_memory import plan_memory

    training = plan_memory(inputs)
    return RunPlan(training, stage_peaks(training))


def plan_for_run(run, hw, gpus: int | None = None) -> RunPlan:
    """The plan of a validated run (:class:`~alignexp.args.RunArgs`) on hardware ``hw`` (``gpus`` GPUs;
    default ``hw``'s world size)."""
    import dataclasses

    from alignexp.scale.plan_memory import make_inputs

    plan_cfg = {"gpus": gpus} if gpus is not None else {}
    train = {"batch_size": run.train.batch_size, "reference": run.train.reference}
    evaluation = {"batch_size": run.eval.batch_size, "max_new_tokens": run.eval.max_new_tokens}
    inputs = make_inputs(dataclasses.asdict(run.model), hw, run.loss.name, run.task, train, evaluation, run.sampler,
                         plan_cfg)
    return plan_run(inputs)
