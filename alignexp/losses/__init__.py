"""Losses: pure functions on (B, n) log-prob tensors, looked up by name with :func:`get_loss`.

Importing this package registers every loss module listed below.
"""

from alignexp.losses import (  # noqa: F401  (registration)
    cpo,
    dpo,
    dpo_variants,
    hinge,
    ipo,
    kto,
    lipo,
    mix,
    ppo,
    pro,
    raft,
    ranked_dpo,
    reward,
    rrhf,
    sft,
    simpo,
    slic,
)
from alignexp.losses.registry import (
    LossOutput,
    LossSpec,
    check_hparams,
    get_loss,
    register_loss,
    registered_losses,
)

__all__ = ["LossOutput", "LossSpec", "check_hparams", "get_loss", "register_loss", "registered_losses"]
