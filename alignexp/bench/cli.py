"""The command line of ``python -m alignexp.bench`` (``--help`` lists the options)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import alignexp.bench.generation as generation
import alignexp.bench.preference as preference
from alignexp.bench.probes import load

PARTS = ("preference", "memory", "generation", "real")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m alignexp.bench", description="The benchmarks of alignexp.bench; "
                                     "each row prints a ratio against a baseline measured in the same run.")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated: preference (against TRL), memory (log-probs at a 32k vocabulary), "
                             "generation (against transformers' generate), real (the preference step against TRL "
                             "and generation against generate on the real model of --real-model)")
    preference.add_arguments(parser)
    generation.add_arguments(parser)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
    names = preference.shape_names(parser, args)
    real_names = preference.real_shape_names(parser, args)

    import torch

    print(f"alignexp benchmarks (torch {torch.__version__}); load average before: {load()}", flush=True)
    report: dict = {"command": "python -m alignexp.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "torch": torch.__version__, "load_before": load()}
    if "preference" in parts:
        report["preference"] = preference.preference_rows(args, names)
    if "memory" in parts:
        report["memory"] = preference.logit_memory_rows(args, names)
    if "generation" in parts:
        report["generation"] = generation.generation_rows(args)
    if "real" in parts:
        report["real"] = real_rows(args, real_names)
    print(f"\nload average after: {load()} (on a busy machine each parallel region waits for its threads to be "
          "scheduled: that adds about the same time per step to both sides and pulls the time ratios towards 1)")
    report["load_after"] = load()
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return report



def real_rows(args: argparse.Namespace, names: list[str]) -> dict:
    """The rows on the real model, or one line saying why they are skipped."""
    path = Path(args.real_model)
    if not (path / "config.json").is_file():
        reason = f"no folder at {path}" if not path.exists() else f"no config.json in {path}"
        print(f"\n== Real model: skipped: {reason}; run make assets "
              "(python -m alignexp.assets fetch smollm2-135m), or give --real-model PATH", flush=True)
        return {"skipped": reason}
    out: dict = {"model": str(path)}
    if names:
        out["preference"] = preference.real_preference_rows(args, names)
    if args.real_gen_runs > 0:
        out["generation"] = generation.real_generation_rows(args)
    return out
