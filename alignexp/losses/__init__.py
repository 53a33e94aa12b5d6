"""Losses: pure functions on (B, n) log-prob tensors, looked up by name with :func:`get_loss`.

Importing this package registers every loss module listed below.
"""

from alignexp.losses import dpo, hinge, ipo, lipo, ppo, pro, raft, ranked_dpo, reward, rrhf, sft, slic  # noqa: F401  (registration)
from alignexp.losses.registry import (
    LossOutput,
    LossSpec,
    check_hparams,
    get_loss,
    register_loss,
    registered_losses,
)

__all__ = ["LossOutput", "LossSpec", "check_hparams", "get_loss", "register_loss", "registered_losses"]
