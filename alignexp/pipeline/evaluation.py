"""The stages after training: the policy saved in Hugging Face format, and evaluated (eval.json and a
printed table); and best-of-N, the inference-time baseline that trains nothing."""

from __future__ import annotations

import dataclasses

from alignexp.distributed import is_main, on_main
from alignexp.evaluation.policy import evaluate_policy
from alignexp.evaluation.results import format_table, write_eval_json
from alignexp.inputs import check_eval_data, check_judge
from alignexp.judges import build_judge
from alignexp.logs import emit
from alignexp.pipeline.context import RunContext, register_stage
from alignexp.pipeline.fit import save_policy
from alignexp.pipeline.preference import sampler_context
from alignexp.provenance import provenance


@register_stage("save_policy", ranks="rank 0 writes (the fit left every rank the whole trained model); the others "
                                    "wait at a barrier")
def save(ctx: RunContext) -> None:
    """The trained policy as <run>/policy (Hugging Face format, with its tokenizer; LoRA merged)."""
    folder = save_policy(ctx.policy, ctx.tokenizer, ctx.out / "policy", ctx.out / "checkpoints")
    if is_main():
        print(f"[alignexp] trained policy (Hugging Face format): {folder}", flush=True)


def _finish(ctx: RunContext, result: dict, loss: str, **extra) -> None:
    """eval.json and the table, by rank 0 (every rank keeps the record)."""
    if hasattr(ctx.task, "describe_gold"):  # a learned gold reward (a classifier): which, and how accurate
        extra = {**extra, "gold_reward_judge": ctx.task.describe_gold()}

    def write() -> dict:
        record = write_eval_json(ctx.out / "eval.json", task=ctx.task.name, loss=loss, model=ctx.args.model.name,
                                 result=result, **extra, **ctx.record_extra, init_from=ctx.init,
                                 provenance=provenance({f"{p.parent.name}/{p.name}": str(p) for p in ctx.caches}))
        emit(format_table(result))
        print(f"[alignexp] eval.json: {ctx.out / 'eval.json'}", flush=True)
        return record

    ctx.record = on_main(write)


def check_evaluation(ctx: RunContext) -> None:
    """The evaluation data (and the held-out rankings named by eval.preference_split) and the run's judge."""
    if ctx.args.eval.enabled:
        check_eval_data(ctx.task, ctx.args.eval)


def check_run_judge(ctx: RunContext) -> None:
    if ctx.args.eval.enabled:
        check_judge(ctx.args.judge, ctx.task, "judge")


@register_stage("evaluate", trains_policy=False, check=(check_evaluation, check_run_judge),
                ranks="sampling and log-probs: prompts sharded over ranks, gathered before the metrics; judge: "
                      "rank 0, broadcast; rank 0 writes eval.json and prints the table")
def evaluate(ctx: RunContext) -> None:
    """The policy against its reference on the task's held-out prompts (the ``eval`` section, the run's judge)."""
    args = ctx.args
    if not args.eval.enabled:
        ctx.record = {"task": ctx.task.name, "loss": ctx.spec.name, "model": args.model.name}
        return
    judge = build_judge(args.judge, ctx.task, key="judge", device=ctx.hw.torch_device)
    result = evaluate_policy(ctx.policy, ctx.reference, ctx.tokenizer, ctx.task, args.eval, judge=judge,
                             max_response_len=args.model.max_response_len, backend=ctx.backend)
    identity = {"judge_identity": judge.identity()} if hasattr(judge, "identity") else {}  # a classifier's source
    _finish(ctx, result, ctx.spec.name, hparams=args.loss.hparams, **identity)


@register_stage("best_of_n", trains_policy=False,
                check=(lambda ctx: check_eval_data(ctx.task, ctx.args.eval),
                       lambda ctx: check_judge(ctx.sampler.judge_config, ctx.task, "sampler.judge", required=True)),
                ranks="sampling: prompts sharded over ranks, gathered before the metrics; judge: rank 0, broadcast; "
                      "rank 0 writes eval.json")
def best_of_n(ctx: RunContext) -> None:
    """Best-of-n sampling of the reference under the sampler's judge, at its analytic KL log n - (n - 1) / n
    (eval.json's ``best_of_n``); nothing is trained."""
    judge = ctx.sampler.judge_for(sampler_context(ctx))
    eval_args = dataclasses.replace(ctx.args.eval, best_of_n=[ctx.sampler.n])
    result = evaluate_policy(ctx.policy, ctx.reference, ctx.tokenizer, ctx.task, eval_args, judge=judge,
                             backend=ctx.backend)
    _finish(ctx, result, "best_of_n")
