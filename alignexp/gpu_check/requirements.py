"""What the GPU check needs beyond torch, found before anything runs, and the wheels that bring it.

``python -m alignexp.gpu_check`` runs from the repository on a GPU machine that may hold nothing but
torch. :func:`missing` names every package it lacks at once (the check exits before it builds
anything); ``bash scripts/gpu_setup.sh`` (``make gpu-setup``) brings them: from the index where the
machine has network, or from wheels in ``.whl/`` that ``bash scripts/gpu_setup.sh download <python
version>`` fetched, on a machine with network, at the versions of its own environment
(:func:`requirements`, here as ``python -m alignexp.gpu_check.requirements requirements``).

Standard library only: it must run where nothing else is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys

REQUIRED = {"yaml": "PyYAML", "lightning": "lightning", "transformers": "transformers", "peft": "peft",
            "tokenizers": "tokenizers", "safetensors": "safetensors"}
"""Module -> distribution: what ``alignexp.gpu_check`` imports on every device."""
REQUIRED_ON_GPU = {"deepspeed": "deepspeed", "omegaconf": "omegaconf"}
"""Needed on a GPU as well: the ZeRO-3 checks (DeepSpeed, and alignexp's training pipeline, which reads its
configs with OmegaConf)."""
OPTIONAL = {"hydra": "hydra-core"}
"""Brought by the setup too: the end-to-end ZeRO-3 check runs ``python -m alignexp.train``, which needs it
(skipped by name without it). FlashAttention-2 and vLLM are left to the ``gpu`` extra: they are built
against one CUDA and torch, and the check runs without them."""
NO_WHEELS = ("deepspeed", "antlr4-python3-runtime")
"""Published as source only: ``gpu_setup.sh download`` builds pure-Python wheels of them here."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken parent
        return False


def missing(device: str) -> list[str]:
    """The distributions (pip names) that the GPU check needs on ``device`` (``cuda`` or ``cpu``) and cannot
    import here, all of them, in a fixed order."""
    needed = {**REQUIRED, **(REQUIRED_ON_GPU if device == "cuda" else {})}
    return [dist for module, dist in needed.items() if not _importable(module)]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: list[str]) -> dict[str, str]:
    """Installed distributions reachable from ``roots`` through their (unconditional) requirements."""
    found: dict[str, str] = {}
    stack = list(roots)
    while stack:
        name = _canonical(stack.pop())
        if name in found:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[name] = dist.version
        for requirement in dist.requires or []:
            if ";" in requirement and "extra ==" in requirement.split(";", 1)[1]:
                continue
            stack.append(_name(requirement))
    return found


def requirements() -> list[str]:
    """``name==version`` of every distribution the GPU check and its optional checks need, with their
    dependencies, at the versions installed here, less torch and what torch itself requires (the GPU
    machine has its own torch, built for its CUDA)."""
    wanted = _closure([*REQUIRED.values(), *REQUIRED_ON_GPU.values(), *OPTIONAL.values()])
    for name in _closure(["torch"]):
        wanted.pop(name, None)
    return [f"{name}=={version}" for name, version in sorted(wanted.items())]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["requirements"]:
        print("\n".join(requirements()))
    elif argv[:1] == ["missing"]:
        print(" ".join(missing(argv[1] if len(argv) > 1 else "cuda")))
    else:
        raise SystemExit("usage: python -m alignexp.gpu_check.requirements requirements | missing [cuda|cpu]")


if __name__ == "__main__":
    main()
