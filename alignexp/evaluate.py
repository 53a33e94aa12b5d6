"""``python -m alignexp.evaluate`` (conf/evaluate.yaml): a saved policy against its reference
(``mode=policy``, writes eval.json), a prompting baseline (``mode=prompting``: a model with k
demonstrations in its prompt, measured the same way), lm-evaluation-harness benchmarks of a policy and
its reference (``mode=benchmarks``), metric-human agreement on labelled pairs (``mode=agreement``), or
AlpacaEval / MT-Bench answer files (``mode=export``). The judge is the ``judge`` group's
(``judge=reward_model judge.path=<run>/reward_model``, ``judge=llm judge.base_url=... judge.model=...``).
The work is done in :mod:`alignexp.evaluation`; docs/evaluation.md defines every metric.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from alignexp.args import EvalArgs, HardwareArgs, ModelArgs, check_choice, from_mapping
from alignexp.config import CONF_DIR, build_task, setup_runtime
from alignexp.errors import ConfigError, run_cli
from alignexp.evaluation import exports
from alignexp.evaluation.agreement import (
    AgreementArgs,
    agreement_rankings,
    agreement_report,
    agreement_scorers,
    implicit_reward_scorer,
    reference_texts,
)
from alignexp.evaluation.benchmarks import (
    BenchmarkArgs,
    check_tasks,
    format_benchmarks,
    run_benchmarks,
    task_manager,
)
from alignexp.evaluation.exports import ExportArgs
from alignexp.evaluation.policy import evaluate_policy
from alignexp.evaluation.prompting import PromptingArgs, evaluate_prompting
from alignexp.evaluation.results import format_agreement, format_table, write_eval_json
from alignexp.files import atomic_write_json, atomic_write_text
from alignexp.judges import build_judge
from alignexp.logs import emit
from alignexp.metrics.preference import pairs_from_rankings
from alignexp.metrics.winrate import Judge
from alignexp.models.backbone import build_model, build_tokenizer
from alignexp.preflight import preflight_evaluate
from alignexp.provenance import provenance
from alignexp.tasks.base import Task

MODES = ("policy", "prompting", "benchmarks", "agreement", "export")


@dataclass
class EvaluateArgs:
    """The command's typed arguments (conf/evaluate.yaml): the mode, the sections each mode reads, the
    ``judge`` and ``task`` options (built later), and the models: ``policy`` and ``reference`` folders,
    the reference defaulting to the one a training run's eval.json names; ``loss`` is that run's."""

    mode: str
    model: ModelArgs
    hardware: HardwareArgs
    eval: EvalArgs
    agreement: AgreementArgs
    export: ExportArgs
    prompting: PromptingArgs
    benchmarks: BenchmarkArgs
    task: dict
    judge: dict
    policy: Path | None
    reference: str | None
    loss: str
    seed: int
    output_dir: Path
    hparams: dict
    reference_source: str = "reference="  # where the reference came from, printed and in eval.json

    def check_inputs(self) -> None:
        """What the mode needs, checked before anything is built."""
        if self.mode in ("policy", "benchmarks") and (self.policy is None or self.reference is None):
            raise ConfigError(f"policy: mode={self.mode} needs policy=<HF folder> and reference=<HF folder> (the "
                              "reference can be left out for a training run's <run>/policy, whose eval.json names it)")
        if self.mode == "prompting" and self.policy is not None:
            raise ConfigError("policy: mode=prompting prompts the model of model.path=<HF folder> (a base model; "
                              "null: the model config's seeded weights), not policy=")
        if self.mode == "export":
            if self.policy is None:
                raise ConfigError("policy: mode=export needs policy=<HF folder>")
            if not self.export.alpaca_eval and not self.export.mt_bench:
                raise ConfigError("export: mode=export needs export.alpaca_eval=<eval set JSON> and/or "
                                  "export.mt_bench=<question.jsonl>")


def _run_folder_info(policy: Path) -> tuple[dict, dict]:
    """The training run's resolved config and eval.json next to a ``<run>/policy`` folder (empty if absent)."""
    run = policy.parent
    config = OmegaConf.to_container(OmegaConf.load(run / "config.yaml")) if (run / "config.yaml").exists() else {}
    record = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    return config, record


def _load_model(model_args: ModelArgs, path: str | Path, tokenizer: Any, hw: HardwareArgs) -> Any:
    """The causal LM at ``path`` with ``model_args``' settings, frozen, in eval mode, on the hardware's device."""
    model = build_model(model_args.with_path(path), tokenizer, hw.device_type)
    return model.to(hw.torch_device).requires_grad_(False).eval()


def _load_models(model_args: ModelArgs, policy_path: Path | None, reference_path: str | None,
                 hw: HardwareArgs) -> tuple[Any, Any, Any]:
    """(tokenizer, policy, reference): the tokenizer of the policy's folder (else the reference's, else
    ``model.path``'s), and each model that has a path (else None)."""
    source = policy_path or reference_path
    tokenizer = build_tokenizer(model_args.with_path(source) if source else model_args)
    policy = _load_model(model_args, policy_path, tokenizer, hw) if policy_path else None
    reference = _load_model(model_args, reference_path, tokenizer, hw) if reference_path else None
    return tokenizer, policy, reference


def _policy_mode(task: Task, judge: Judge | None, args: EvaluateArgs, loaded: tuple) -> dict:
    tokenizer, policy, reference = loaded
    result = evaluate_policy(policy, reference, tokenizer, task, args.eval, judge=judge,
                             max_response_len=args.model.max_response_len)
    path = args.output_dir / "eval.json"
    record = write_eval_json(path, task=task.name, loss=args.loss, model=args.model.name, result=result,
                             policy_path=str(args.policy), init_from=str(args.reference),
                             reference_source=args.reference_source, hparams={"beta": args.eval.beta},
                             provenance=provenance())
    emit(format_table(result))
    print(f"[alignexp] eval.json: {path}", flush=True)
    return record


def _prompting_mode(task: Task, judge: Judge | None, args: EvaluateArgs) -> dict:
    tokenizer = build_tokenizer(args.model)
    model = _load_model(args.model, args.model.path, tokenizer, args.hardware)  # path null: the seeded weights
    reference = _load_model(args.model, args.reference, tokenizer, args.hardware) if args.reference else None
    result = evaluate_prompting(model, reference, tokenizer, task, args.eval, args.prompting, judge=judge)
    path = args.output_dir / "eval.json"
    record = write_eval_json(path, task=task.name, loss="prompting", model=args.model.name, result=result,
                             method=args.prompting.method, model_path=args.model.path,
                             init_from=str(args.reference) if args.reference else None,
                             reference_source=args.reference_source if args.reference else None,
                             provenance=provenance())
    emit(format_table(result))
    print(f"[alignexp] eval.json: {path}", flush=True)
    return record


def _benchmarks_mode(args: EvaluateArgs, manager: Any) -> dict:
    section = run_benchmarks(str(args.policy), str(args.reference), args.benchmarks, manager,
                             args.hardware.torch_device, args.model.dtype, args.seed)
    path = args.output_dir / "eval.json"
    record = write_eval_json(path, task="benchmarks", loss=args.loss, model=args.model.name,
                             result={"n_prompts": 0, "policy": {}, "reference": {}, "comparisons": {}},
                             benchmarks=section, policy_path=str(args.policy), init_from=str(args.reference),
                             reference_source=args.reference_source, hparams=args.hparams,
                             provenance=provenance())
    print(format_benchmarks(section), flush=True)
    print(f"[alignexp] eval.json: {path}", flush=True)
    return record


def _agreement_mode(task: Task, judge: Judge | None, args: EvaluateArgs, loaded: tuple) -> dict:
    tokenizer, policy, reference = loaded
    examples = agreement_rankings(task, reference or policy, tokenizer, args.eval, args.agreement)
    pairs = pairs_from_rankings(examples, reference_texts(task, args.agreement.references))
    implicit = None
    if policy is not None and reference is not None:
        implicit = implicit_reward_scorer(policy, reference, tokenizer, args.eval, args.model.max_response_len)
    report = agreement_report(pairs, agreement_scorers([judge] if judge is not None else [], args.eval.batch_size,
                                                       args.eval.progress, implicit))
    record = {"task": task.name, "n_rankings": len(examples), "n_pairs": len(pairs),
              "n_pairs_with_reference": sum(p.reference is not None for p in pairs), "agreement": report}
    path = atomic_write_json(args.output_dir / "agreement.json", record)
    print(format_agreement(report), flush=True)
    print(f"[alignexp] agreement.json: {path}", flush=True)
    return record


def _export_mode(judge: Judge | None, args: EvaluateArgs, loaded: tuple) -> dict:
    tokenizer, policy, _ = loaded
    export_args, out, seed, progress = args.export, args.output_dir, args.seed, args.eval.progress
    model_id = export_args.model_id or (args.policy.parent.name if args.policy.name == "policy" else args.policy.name)
    generate_fn = exports.engine_generator(policy, tokenizer, export_args.max_new_tokens, args.eval.max_prompt_len,
                                           export_args.batch_size)
    record: dict[str, Any] = {"model_id": model_id}
    if export_args.alpaca_eval:
        outputs = exports.alpaca_eval_outputs(exports.read_alpaca_eval(export_args.alpaca_eval), generate_fn,
                                              model_id, export_args.temperature, seed, progress=progress)
        record["alpaca_eval"] = str(exports.write_json(out / "alpaca_eval" / "model_outputs.json", outputs))
    if export_args.mt_bench:
        questions = exports.read_mt_bench(export_args.mt_bench)
        answers = exports.mt_bench_answers(questions, generate_fn, model_id, seed, progress=progress)
        record["mt_bench"] = str(exports.write_jsonl(out / "mt_bench" / "model_answer" / f"{model_id}.jsonl",
                                                     answers))
        if judge is not None:
            judgments, scores = exports.grade_mt_bench(questions, answers, exports.chat_completion(judge),
                                                       getattr(judge, "model", judge.name), progress=progress)
            exports.write_jsonl(out / "mt_bench" / "model_judgment" / "single.jsonl", judgments)
            record["mt_bench_scores"] = scores
        else:
            record["mt_bench_grading"] = "not graded: judge=llm judge.base_url=... judge.model=... grades the answers"
    atomic_write_json(out / "exports.json", record)
    for key, value in record.items():
        print(f"[alignexp] {key}: {value}", flush=True)
    return record


def parse(cfg: DictConfig) -> EvaluateArgs:
    """The composed config as :class:`EvaluateArgs`; a bad key or value raises ConfigError naming it."""
    container = OmegaConf.to_container(cfg, resolve=True)
    check_choice("mode", container["mode"], MODES)
    model = from_mapping(ModelArgs, container["model"], "model")
    from alignexp.config import resolve_model_source

    model = resolve_model_source(model, container["paths"]["cache_dir"])
    policy = Path(container["policy"]).expanduser() if container["policy"] else None
    run_config, run_record = _run_folder_info(policy) if policy else ({}, {})
    loss = run_config.get("loss") or {}
    beta = container["beta"] if container["beta"] is not None else loss.get("beta", 1.0)
    return EvaluateArgs(
        mode=container["mode"], model=model,
        hardware=from_mapping(HardwareArgs, container["hardware"], "hardware"),
        eval=from_mapping(EvalArgs, container["eval"], "eval", max_prompt_len=model.max_prompt_len, beta=float(beta)),
        agreement=from_mapping(AgreementArgs, container["agreement"], "agreement"),
        export=from_mapping(ExportArgs, container["export"], "export"),
        prompting=from_mapping(PromptingArgs, container["prompting"], "prompting"),
        benchmarks=from_mapping(BenchmarkArgs, container["benchmarks"], "benchmarks"),
        task=dict(container["task"]), judge=dict(container["judge"]), policy=policy,
        reference=container["reference"] or run_record.get("init_from"),
        loss=loss.get("name", run_record.get("loss", "unknown")), seed=container["seed"],
        output_dir=Path(container["paths"]["output_dir"]), hparams=dict(run_record.get("hparams") or {}),
        reference_source="reference=" if container["reference"] or not run_record.get("init_from")
        else f"init_from of {policy.parent / 'eval.json'}")


def run(cfg: DictConfig) -> dict:
    """The mode's work for a composed config (the only function here that sees it); returns what it wrote."""
    args = parse(cfg)
    args.check_inputs()
    if args.policy is not None or args.reference is not None:
        print(f"[alignexp] policy: {args.policy or '-'}; reference: {args.reference or '-'}"
              + (f" (from {args.reference_source})" if args.reference else ""), flush=True)
    setup_runtime(args.seed, args.hardware.threads, verbose=bool(cfg.get("verbose", False)))
    if args.mode == "benchmarks":  # the tasks are checked (and the harness found) before any model loads
        preflight_evaluate(args, None, wants_judge=False)  # the folders, the hardware, the output folder
        manager = task_manager(args.benchmarks)
        check_tasks(manager, args.benchmarks)
        atomic_write_text(args.output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        return _benchmarks_mode(args, manager)
    task = build_task(args.task)
    # MT-Bench grading needs a judge chosen by name; auto (gold or none) grades nothing.
    wants_judge = args.mode != "export" or args.judge.get("name") != "auto"
    preflight_evaluate(args, task, wants_judge)  # every input, checked before a model is built
    judge = build_judge(args.judge, task, "judge", device=args.hardware.torch_device) if wants_judge else None
    if args.mode == "export" and args.export.mt_bench and judge is not None:
        exports.chat_completion(judge)  # a judge that cannot grade fails here, before any answer is generated
    out = args.output_dir
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if args.mode == "prompting":
        return _prompting_mode(task, judge, args)
    loaded = _load_models(args.model, args.policy, args.reference, args.hardware)
    if args.mode == "policy":
        return _policy_mode(task, judge, args, loaded)
    if args.mode == "agreement":
        return _agreement_mode(task, judge, args, loaded)
    return _export_mode(judge, args, loaded)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """The Hydra entry point: errors a user can fix exit with their status (:func:`alignexp.errors.run_cli`)."""
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
