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

Where vLLM samples (one GPU; :func:`~alignexp.scale.plan_memory.plan_backend`), it runs in the training process
beside the HF models and brings memory of its own, which the sampling and evaluation stages count instead
of the HF engine's generation batch:

* while it samples, its share ``vllm.gpu_memory_utilization`` x the GPU's memory (its copy of the weights,
  its activations and its KV cache: vLLM takes the whole share, and refuses to start where that much is
  not free), plus its CUDA graphs' pool, which lies outside the share (``plan.vllm_cuda_graph_gib``,
  default 1 GiB, an assumption; none with ``vllm.enforce_eager=true``);
* while it sleeps (training, and evaluation's log-prob forward): level-1 sleep moves its weights to host
  memory and frees its KV cache; the CUDA graphs' pool stays.

The plan also says how many tokens of KV cache the share leaves after vLLM's weights, and the run does not
fit where the share cannot hold its weights (vLLM would start with no room for a KV cache).

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


@dataclass
class VllmMemory:
    """vLLM's memory per GPU where it samples (see the module docstring): ``share`` (None where the GPU's memory
    is not known: then its weights and one batch's KV cache stand for it), its ``weights``, the ``kv_tokens``
    its share leaves for the KV cache (None: unknown), and the CUDA ``graphs``' pool."""

    share: float | None
    weights: float
    kv_tokens: int | None
    graphs: float

    @property
    def sampling(self) -> float:
        return self.share if self.share is not None else self.weights

    def note(self, i) -> str:
        graphs = "no CUDA graphs (enforce_eager)" if i.vllm_eager else f"CUDA graphs {self.graphs / GIB:.2f} GiB"
        if self.share is None:
            return (f"vLLM samples ({i.backend_reason}): its share vllm.gpu_memory_utilization={i.vllm_utilization:g} "
                    f"of an unknown GPU memory (give hardware.gpu_memory_gib); counted as its weights "
                    f"{self.weights / GIB:.2f} GiB and one batch's KV cache; {graphs} outside the share")
        kv = (f"KV cache for {self.kv_tokens:,} tokens" if self.kv_tokens else
              "NO room for a KV cache: raise vllm.gpu_memory_utilization")
        return (f"vLLM samples ({i.backend_reason}): vllm.gpu_memory_utilization={i.vllm_utilization:g} x "
                f"{i.gpu_memory_gib:g} GiB = {self.share / GIB:.2f} GiB while it samples (weights "
                f"{self.weights / GIB:.2f} GiB, {kv}), {graphs} outside the share; asleep in training")


VLLM_ACTIVATION_FRACTION = 0.1
"""Of vLLM's share, what its profiling run's activations take before the KV cache is sized (an assumption)."""


def vllm_memory(plan: MemoryPlan) -> VllmMemory | None:
    """vLLM's memory per GPU for ``plan``'s run, None where the HF engine samples."""
    i, c = plan.inputs, plan.counts
    if i.sampler_backend != "vllm":
        return None
    p = DTYPE_BYTES[i.model_dtype]
    weights = p * c.total
    graphs = 0.0 if i.vllm_eager else i.vllm_graph_gib * GIB
    if i.gpu_memory_gib is None:
        kv = generation_bytes(plan, max(1, i.sample_batch), i.prompt_len, i.sample_new_tokens)
        return VllmMemory(None, weights + kv, None, graphs)
    share = i.vllm_utilization * i.gpu_memory_gib * GIB
    per_token = 2 * c.n_layers * c.kv_heads * c.head_dim * p
    room = share * (1 - VLLM_ACTIVATION_FRACTION) - weights
    return VllmMemory(share, weights, max(0, int(room // per_token)), graphs)


def stage_peaks(plan: MemoryPlan) -> list[StagePeak]:
    """The per-stage peaks of ``plan``'s run (see the module docstring)."""
    i, c, hw = plan.inputs, plan.counts, plan.inputs.hardware
    p = DTYPE_BYTES[i.model_dtype]
    adapters = 4.0 * c.trainable if i.lora else 0.0
    weights = {"policy": p * c.total + adapters,
               "reference": p * c.total if i.reference in ("precompute", "frozen") else 0.0}
    overhead = {"allowance": plan.overhead}
    vllm = vllm_memory(plan)
    asleep = {"vLLM asleep (CUDA graphs)": vllm.graphs} if vllm is not None else {}
    if vllm is not None:
        engine = {"vLLM share": vllm.sampling, "vLLM CUDA graphs": vllm.graphs}
        peaks = [StagePeak("sampling", {**weights, **engine, **overhead})]
    else:
        peaks = [StagePeak("sampling", {**weights, "generation": generation_bytes(
            plan, max(1, i.sample_batch), i.prompt_len, i.sample_new_tokens), **overhead})]
    if i.reference == "precompute":
        forward = activation_bytes(c, i.rows, i.prompt_len, i.response_len, i.n_responses, p,
                                   checkpointing=False, reference_forward=True).reference
        peaks.append(StagePeak("reference log-probs", {**weights, "forward": forward, **asleep, **overhead}))
    steady = {"model states": plan.states.gpu, "reference": plan.reference_weights,
              "activations": plan.activations.peak, **asleep, **overhead}
    sharded = hw.strategy == "fsdp" or (hw.strategy == "deepspeed" and hw.zero_stage == 3)
    if sharded:
        master = 4 if hw.strategy == "fsdp" and hw.precision.endswith("-mixed") else p
        setup = {"whole policy before sharding": master * c.total + adapters, **asleep, **overhead}
        peaks.append(StagePeak("training", steady if sum(steady.values()) >= sum(setup.values()) else setup))
        peaks.append(StagePeak("gather", {"model states": plan.states.gpu, "reference": plan.reference_weights,
                                          "whole trained policy": p * c.total + adapters, **asleep, **overhead}))
    else:
        peaks.append(StagePeak("training", steady))
    eval_generation = generation_bytes(plan, i.eval_batch, i.prompt_len, i.eval_new_tokens)
    eval_logps = activation_bytes(c, i.eval_batch, i.prompt_len, i.eval_new_tokens, 1, p, checkpointing=False,
                                  reference_forward=True).reference
    if vllm is not None:  # vLLM samples, then sleeps while the HF models compute the KL's log-probs
        sampling, forward = vllm.sampling + vllm.graphs, eval_logps + vllm.graphs
        part = ("vLLM share + CUDA graphs", sampling) if sampling >= forward else ("log-probs + CUDA graphs", forward)
        peaks.append(StagePeak("evaluation", {**weights, part[0]: part[1], **overhead}))
    else:
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
    vllm: VllmMemory | None = None

    @property
    def peak_gib(self) -> float:
        return max(stage.total for stage in self.peaks) / GIB

    @property
    def fits(self) -> bool | None:
        memory = self.training.inputs.gpu_memory_gib
        if memory is None:
            return None
        return self.peak_gib <= memory and (self.vllm is None or bool(self.vllm.kv_tokens))

    def table(self) -> str:
        lines = [self.training.table(), "", stage_table(self.peaks)]
        if self.vllm is not None:
            lines.append(self.vllm.note(self.training.inputs))
        if self.fits is not None:
            worst = max(self.peaks, key=lambda stage: stage.total)
            lines.append(f"run fits: {'yes' if self.fits else 'NO'} (largest stage: {worst.name}, "
                         f"{self.peak_gib:.1f} of {self.training.inputs.gpu_memory_gib:g} GiB per GPU)")
        return "\n".join(lines)

    def record(self) -> dict:
        vllm = None if self.vllm is None else {
            "share_gib": None if self.vllm.share is None else round(self.vllm.share / GIB, 3),
            "weights_gib": round(self.vllm.weights / GIB, 3), "kv_cache_tokens": self.vllm.kv_tokens,
            "cuda_graphs_gib": round(self.vllm.graphs / GIB, 3)}
        return {**self.training.record(), "stages_gib": {s.name: round(s.total / GIB, 3) for s in self.peaks},
                "peak_gib": round(self.peak_gib, 3), "run_fits": self.fits,
                "sampling": {"backend": self.training.inputs.sampler_backend,
                             "reason": self.training.inputs.backend_reason, "vllm": vllm}}


def plan_run(inputs) -> RunPlan:
    """The training plan and the per-stage peaks for :class:`~alignexp.scale.plan_memory.PlanInputs`."""
    from alignexp.scale.plan_memory import plan_memory

    training = plan_memory(inputs)
    return RunPlan(training, stage_peaks(training), vllm_memory(training))


def plan_for_run(run, hw, gpus: int | None = None) -> RunPlan:
    """The plan of a validated run (:class:`~alignexp.args.RunArgs`) on hardware ``hw`` (``gpus`` GPUs;
    default ``hw``'s world size)."""
    import dataclasses

    from alignexp.scale.plan_memory import make_inputs

    plan_cfg = {"gpus": gpus} if gpus is not None else {}
    train = {"batch_size": run.train.batch_size, "reference": run.train.reference}
    evaluation = {"batch_size": run.eval.batch_size, "max_new_tokens": run.eval.max_new_tokens}
    inputs = make_inputs(dataclasses.asdict(run.model), hw, run.loss.name, run.task, train, evaluation, run.sampler,
                         plan_cfg, backend=run.backend, vllm=dataclasses.asdict(run.vllm))
    return plan_run(inputs)
