"""Reference log-probs, computed by one function for every path (:func:`reference_token_logps`): the
precomputed and cached ones (:func:`cached_ref_logps`), a frozen reference's in the training step
(:class:`alignexp.lightning_modules.preference.PreferenceModule`), and PPO's tempered reference
(:mod:`alignexp.lightning_modules.ppo`). :func:`response_logps` runs it over encoded examples (a reference's
or a policy's), and the reference's are computed once per (model, data, tokenisation) and cached on disk.

Precomputing is the default where the reference is fixed, so training holds one model in memory,
and the runs of a sweep that share a reference and data share the cache. On N ranks the batches are
sharded over the ranks and gathered (the one-process result exactly); the cache is written by rank 0
under a lock (:func:`alignexp.distributed.shared_cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from alignexp.distributed import shard_batches, shared_cache
from alignexp.files import atomic_write, code_keyed
from alignexp.models.batched import map_batches
from alignexp.models.logprobs import EncodedExample, PackedBatch, per_response, token_logps

log = logging.getLogger(__name__)

# The modules whose code shapes cached reference log-probs: a change to one recomputes them.
REFERENCE_CODE = ("alignexp.models.reference", "alignexp.models.logprobs", "alignexp.models.attention",
                  "alignexp.models.batched")


def model_fingerprint(model) -> str:
    """A hash of the model's architecture and weights (names, shapes, two checksums per tensor).

    The weights are those of the function the model computes (:func:`alignexp.models.lora.fingerprint_state`):
    the reference of a LoRA policy (adapters off) hashes like its base model, so its cached
    log-probs are the base model's.
    """
    from alignexp.models.lora import fingerprint_state

    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in fingerprint_state(model).items():
            p = param.detach().float()
            digest.update(f"{name}{tuple(p.shape)}{p.sum().item():.6e}{p.abs().sum().item():.6e}".encode())
    return digest.hexdigest()[:16]


def data_fingerprint(encoded: Sequence[EncodedExample]) -> str:
    digest = hashlib.sha256()
    for ex in encoded:
        digest.update(json.dumps([ex.prompt_ids, ex.response_ids]).encode())
    return digest.hexdigest()[:16]


def response_logps(model, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int = 32,
                   desc: str | None = None) -> list[Tensor]:
    """Each example's summed log-probs log pi(y_k|x) of its n responses under ``model`` (a reference
    or a policy), (n,) on the CPU, without gradients (:func:`alignexp.models.batched.map_batches`).
    Every rank calls it: its batches are sharded over the ranks and the rows gathered, in order."""
    return shard_batches(lambda part: map_batches(model, part, pad_id, batch_size, reference_logps),
                         list(encoded), batch_size, desc)


@torch.no_grad()
def reference_token_logps(model, batch: PackedBatch, temperature: float = 1.0) -> Tensor:
    """Per-token log-probs ``(N,)`` in fp32 of a model that is not trained (a reference), without gradients:
    log pi_ref,T(y_t | x, y_<t) at temperature T (:func:`alignexp.models.logprobs.token_logps`; T = 1 but
    for PPO, whose KL penalty is to the tempered reference). Every reference log-prob of alignexp comes
    from here; :func:`reference_logps` sums them per response."""
    return token_logps(model, batch, temperature=temperature)


def reference_logps(model, batch: PackedBatch) -> Tensor:
    """Summed log-probs ``(B, n)`` of each response under a reference, log pi_ref(y_k|x) (DPO's Eq. 7 term),
    without gradients; 0 in masked slots."""
    return per_response(reference_token_logps(model, batch), batch)


def cached_ref_logps(model, encoded: Sequence[EncodedExample], pad_id: int, cache_dir: str | Path,
                     batch_size: int = 32) -> list[Tensor]:
    """:func:`response_logps` of the reference, read from ``cache_dir/reference/<model>-<data>.pt`` when present."""
    path = code_keyed(Path(cache_dir) / "reference" / f"{model_fingerprint(model)}-{data_fingerprint(encoded)}.pt",
                      REFERENCE_CODE)

    def load(found: Path) -> list[Tensor]:
        log.info("reference log-probs: read from %s", found)
        return torch.load(found)

    def save(rows: list[Tensor], target: Path) -> None:
        atomic_write(target, lambda tmp: torch.save(rows, tmp))
        log.info("reference log-probs: computed for %d examples, cached at %s", len(rows), target)

    return shared_cache(path, lambda: response_logps(model, encoded, pad_id, batch_size, desc="reference log-probs"),
                        save, load, what="reference log-probs")
