"""What produced a result: the code's commit, the versions of the packages that compute, and the caches
read, recorded in every eval.json so a result can be traced and rerun."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("alignexp", "torch", "transformers", "lightning", "hydra-core", "omegaconf", "peft", "deepspeed",
            "tokenizers", "datasets", "sacrebleu", "lm-eval", "vllm")


def code_commit() -> str | None:
    """The git commit of the alignexp checkout in use (``-dirty`` when it has uncommitted changes to
    tracked files); None for an installed wheel or where git is missing."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def package_versions() -> dict[str, str]:
    """The installed versions of the packages that decide a result (those not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def provenance(caches: dict[str, str] | None = None) -> dict:
    """``{"commit", "packages", "caches"}``: the code, its dependencies and the cache entries a run used
    (their file or folder names are the digests of what they hold)."""
    return {"commit": code_commit(), "packages": package_versions(), "caches": dict(sorted((caches or {}).items()))}
