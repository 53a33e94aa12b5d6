"""The docs run as written: every file a doc shows whole is written exactly as shown (first line included)
and the doc's commands that use them run on them, and every command of every doc is accounted for by a
test (so that a new one cannot escape): run here, composed and validated (it needs a hub model, a GPU or a
cluster), or run by CI itself."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

from tests.conftest import REPO
from tests.fixtures.doc_files import commands, file_blocks

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "experiments").glob("*/README.md"))]
# What runs each command that is not run here: CI's own steps; tests/smoke/test_readme.py and
# tests/integration/test_evaluate.py, which compose and validate (or run, where nothing is missing) every
# `python -m alignexp.*` command of the docs; the studies' drivers, whose committed results and README are
# their record (hours of CPU); and the shell set-up lines of a GPU node (scripts/, run by `make gpu-check`).
ELSEWHERE = (r"^make [a-z-]+$", r"^pip install ", r"^(srun )?python -m alignexp\.", r"^bash scripts/",
             r"^rm -rf ", r"^(bash|python) experiments/[\w/]+\.(sh|py)\b", r"^mkdir -p ", r"^pip (download|wheel) ",
             r"^v\(\) \{")


def normalised(command: str) -> str:
    """A command without its leading environment assignments and virtual environment's folder."""
    command = re.sub(r"^(\w+=\S+ )+", "", command)
    return re.sub(r"^\.venv/bin/", "", command)


def test_the_readme_s_own_files_train_through_its_own_commands(tmp_path, cache_dir):
    """my_losses.py, conf/loss/my_loss.yaml and conf/experiment/my_study.yaml, written as the README shows
    them, trained by the README's two commands (debug=fast added, the only change), in one process."""
    readme = (REPO / "README.md").read_text()
    files = file_blocks(readme)
    assert {"my_losses.py", "conf/loss/my_loss.yaml", "conf/experiment/my_study.yaml"} <= set(files)
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert (tmp_path / "conf/experiment/my_study.yaml").read_text().startswith("# @package _global_\n")
    shown = [c for c in commands(readme) if "--config-dir ./conf" in c]
    assert len(shown) == 2, shown
    rows = []
    for command in shown:
        words = shlex.split(command.replace("PYTHONPATH=. ", "").replace("alignexp-train", "python -m alignexp.train"))
        rows.append(["alignexp.train", [*words[3:], "debug=fast", f"paths.cache_dir={cache_dir}"]])
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fixtures" / "cli_rows.py"), str(tmp_path / "rows.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in results] == [0, 0], [r["stderr"][-2000:] for r in results]
    records = sorted((json.loads(p.read_text()) for p in tmp_path.glob("outputs/synthetic/*/*/eval.json")),
                     key=lambda r: r["hparams"]["gamma"])
    assert [(r["loss"], r["hparams"]["gamma"]) for r in records] == [("my_loss", 0.5), ("my_loss", 1.0)]


def test_every_command_of_the_docs_is_accounted_for():
    shown = {c for doc in DOCS for c in commands(doc.read_text())}
    assert len(shown) >= 20
    unaccounted = sorted(part for c in shown if "--config-dir ./conf" not in c for part in c.split(" && ")
                         if not any(re.match(pattern, normalised(part)) for pattern in ELSEWHERE))
    assert not unaccounted, f"commands no test runs or checks: {unaccounted}"


# The loss each of the README's data files trains with, as the README says.
DATA_FILES = {"pairs.jsonl": "dpo", "ranked.jsonl": "ranked_dpo", "scored.jsonl": "lipo", "chat.jsonl": "dpo",
              "feedback.jsonl": "kto"}


def test_the_readme_s_data_formats_train_as_shown(tmp_path, cache_dir):
    """Each custom data file the README shows, written exactly as shown, trains under task=custom (a ranked
    list without scores among them), in one process."""
    files = file_blocks((REPO / "README.md").read_text())
    assert set(DATA_FILES) <= set(files)
    rows = []
    for name, loss in DATA_FILES.items():
        (tmp_path / name).write_text(files[name])
        assert len(files[name].splitlines()) == 5
        rows.append(["alignexp.train", ["task=custom", f"task.path={tmp_path / name}", f"loss={loss}", "debug=fast",
                                         "eval.max_new_tokens=4", f"paths.cache_dir={cache_dir}",
                                         f"hydra.run.dir={tmp_path / 'runs' / name}"]])
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fixtures" / "cli_rows.py"), str(tmp_path / "rows.json")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in results] == [0] * len(DATA_FILES), [r["stderr"][-1500:] for r in results]
    for name, loss in DATA_FILES.items():
        record = json.loads((tmp_path / "runs" / name / "eval.json").read_text())
        assert record["loss"] == loss and record["task"] == "custom"


def test_the_readme_s_file_map_names_every_module():
    """Each module of alignexp/ is named in the README's file map: a top-level one as ``name.py``, one in a
    package by its name under the package's line (``pipeline/ ... fit (...)``)."""
    readme = (REPO / "README.md").read_text()
    files = readme[readme.index("## Files"):]
    missing = []
    for path in sorted((REPO / "alignexp").rglob("*.py")):
        relative = path.relative_to(REPO / "alignexp")
        if len(relative.parts) == 1:
            if f"  {relative.name} " not in files:
                missing.append(str(relative))
            continue
        package, stem = relative.parts[0], relative.stem
        if stem in ("__init__", "__main__"):
            continue
        block = files[files.index(f"  {package}/"):]
        block = block[:next((i for i in range(1, len(block)) if block[i:].startswith("\n  ") and block[i + 3] != " "),
                            len(block))]
        if not re.search(rf"\b{stem}\b", block):
            missing.append(str(relative))
    assert not missing, f"modules the README's file map does not name: {missing}"
