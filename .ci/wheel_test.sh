#!/usr/bin/env bash
# The installed-wheel test (`make test-wheel`; CI runs it after `make test`): build alignexp's wheel, install
# it into a fresh virtual environment outside the checkout (the CPU build of torch first), and use it from
# other folders as a user's research repository would: every console script's --help, every config file
# shipped and every experiment composed and validated, the default experiment under debug=fast end to end,
# and the README's own loss and experiment, in a folder outside the package, trained by the README's commands.
# Outputs and caches must land in the working folder (or ALIGNEXP_CACHE_DIR), never in the installed package.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/alignexp-wheel.XXXXXX")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
unset PYTHONPATH ALIGNEXP_CACHE_DIR  # only the installed package, and the default cache folder
start=$SECONDS

step() { echo "[wheel test] $((SECONDS - start)) s: $*"; }
fail() { echo "[wheel test] FAILED: $*" >&2; exit 1; }
finish() {
    local status=$?
    if [ "$status" -eq 0 ]; then rm -rf "$WORK"; else echo "[wheel test] its files are kept in $WORK" >&2; fi
}
trap finish EXIT
# Run a command with its output in a log file, shown (its end) only when it fails.
quiet() {
    local log=$1; shift
    "$@" >"$log" 2>&1 || { tail -n 60 "$log" >&2; fail "$* (log: $log)"; }
}

step "building the wheel from a copy of the checkout's package, configs and metadata"
mkdir "$WORK/src"
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/alignexp" "$REPO/conf" "$REPO/hydra_plugins" "$WORK/src/"
"$PYTHON" -m venv "$WORK/venv"
V="$WORK/venv/bin"
quiet "$WORK/wheel.log" "$V/python" -m pip wheel --no-deps -w "$WORK/dist" "$WORK/src"
wheel=$(ls "$WORK"/dist/alignexp-*.whl)

step "installing $TORCH_PIN, then $(basename "$wheel") and its dependencies into a fresh virtual environment"
quiet "$WORK/install.log" "$V/pip" install --no-compile "$TORCH_PIN"
# the tune extra too: experiment=tune (composed below) chooses its Optuna sweeper
quiet "$WORK/install.log" "$V/pip" install --no-compile "$wheel[tune]"
mkdir "$WORK/run"
cd "$WORK/run"  # outside the checkout from here on: `python -c` and `-m` put the working folder on the path
package=$("$V/python" -c "import alignexp, os; print(os.path.dirname(alignexp.__file__))")
case "$package" in "$WORK/venv/"*) ;; *) fail "alignexp imported from $package, not from the fresh environment" ;; esac
contents() { (cd "$package" && find . -path '*/__pycache__' -prune -o -print | sort); }
contents >"$WORK/package-before.txt"

step "--help of every console script, from $PWD"
for tool in train evaluate sample data plan; do
    quiet "$WORK/help.txt" "$V/alignexp-$tool" --help
    grep -q "== Configuration groups ==" "$WORK/help.txt" || fail "alignexp-$tool --help lists no config groups"
done
quiet "$WORK/help.txt" "$V/alignexp-report" --help
grep -q "usage:" "$WORK/help.txt" || fail "alignexp-report --help printed no usage"
quiet "$WORK/help.txt" "$V/python" -m alignexp.train --help
grep -q "^experiment: .*rso" "$WORK/help.txt" || fail "python -m alignexp.train --help lists no experiments"

step "every config file shipped; every experiment composed and validated"
(cd "$REPO/conf" && find . -name '*.yaml' | sed 's|^\./||' | sort) >"$WORK/conf-files.txt"
quiet "$WORK/compose.log" "$V/python" - "$WORK/conf-files.txt" <<'EOF'
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import alignexp
from alignexp.config import conf_dir, validate

conf = Path(conf_dir())
assert conf == Path(alignexp.__file__).resolve().parent / "conf", f"the config tree is {conf}"
shipped = sorted(p.relative_to(conf).as_posix() for p in conf.rglob("*.yaml"))
expected = Path(sys.argv[1]).read_text().split()
assert shipped == expected, f"the wheel lacks {sorted(set(expected) - set(shipped))}"
experiments = [p[len("experiment/"):-len(".yaml")] for p in shipped if p.startswith("experiment/")]
for name in experiments:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}", "paths.output_dir=out", "paths.cache_dir=cache"])
    validate(cfg)
print(f"{len(shipped)} config files shipped; experiments composed and validated: {', '.join(experiments)}")
EOF
tail -n 1 "$WORK/compose.log"

step "the default experiment under debug=fast, by the console script"
quiet "$WORK/train.log" "$V/alignexp-train" debug=fast
ls outputs/synthetic/ranked_dpo/*/eval.json >/dev/null || fail "no eval.json under $PWD/outputs"
ls -d .cache/alignexp/sft/* >/dev/null || fail "no SFT policy cached under $PWD/.cache/alignexp"
quiet "$WORK/report.log" "$V/alignexp-report" outputs --out report
test -s report/results.md || fail "alignexp-report wrote no results.md"

step "the README's own loss and experiment, in a folder outside the package, by the README's commands"
mkdir "$WORK/research"
cd "$WORK/research"
# The README's files: each block that the README shows as a whole file (my_losses.py, conf/...), written here
# exactly as shown, first line included (tests/fixtures/doc_files.py finds them).
quiet "$WORK/readme.log" "$V/python" "$REPO/tests/fixtures/doc_files.py" "$REPO/README.md"
for path in my_losses.py conf/loss/my_loss.yaml conf/experiment/my_study.yaml; do
    [ -f "$path" ] || fail "the README shows no file block for $path"
done
# The cache of the first run, named by ALIGNEXP_CACHE_DIR: its SFT policy is reused, nothing is cached here.
export ALIGNEXP_CACHE_DIR="$WORK/run/.cache/alignexp"
# Under `python -m` the working folder is on the path.
quiet "$WORK/user.log" "$V/python" -m alignexp.train --config-dir ./conf loss=my_loss 'imports=[my_losses]' debug=fast
grep -q '"loss": "my_loss"' outputs/synthetic/my_loss/*/eval.json || fail "the user's loss did not train"
test ! -e .cache || fail "a cache was written in $PWD although ALIGNEXP_CACHE_DIR names another folder"
# A console script does not put the working folder on the path: the module is named, with exit status 2 ...
status=0
"$V/alignexp-train" --config-dir ./conf experiment=my_study debug=fast >"$WORK/noimport.log" 2>&1 || status=$?
[ "$status" -eq 2 ] && grep -q "imports: cannot import 'my_losses'" "$WORK/noimport.log" \
    || { cat "$WORK/noimport.log" >&2; fail "an unimportable user module was not named (exit $status)"; }
# ... and with PYTHONPATH the user's experiment trains, with its own setting of the loss.
PYTHONPATH=. quiet "$WORK/study.log" "$V/alignexp-train" --config-dir ./conf experiment=my_study debug=fast
grep -q '"gamma": 1.0' outputs/synthetic/my_study/*/eval.json || fail "the user's experiment did not train"

contents | diff "$WORK/package-before.txt" - >&2 || fail "files were written inside the installed package"
step "the installed wheel passed"
