"""What a run prints: each line once, library noise filtered where it starts, rank 0 alone on several processes.

:func:`quiet_libraries` is called by the entry points (never at import). What it silences, each at its source:

* Lightning's loggers print through a handler of their own *and* propagate to the root logger that Hydra
  formats, so every Lightning line came twice: their own handler is removed, and below WARNING they are quiet
  (``GPU available: False``, the litlogger advertisement, ``Trainer.fit stopped``);
* warnings raised inside libraries about the libraries themselves (deprecations, FutureWarnings, and the
  Lightning notices listed in :data:`LIBRARY_NOTICES`, which say nothing about the run);
* transformers' and huggingface_hub's progress bars (``Loading weights``, ``Writing model shards``);
* absl's INFO lines (rouge-score's ``Using default tokenizer.``);
* DeepSpeed's ``Setting accelerator to CPU`` on a machine without CUDA, printed whenever a library imports
  DeepSpeed (accelerate does, when transformers saves a model): there, ``DS_ACCELERATOR=cpu`` names what
  DeepSpeed would pick anyway.

``verbose=True`` (the ``verbose`` key of every command) leaves every library as it is, still each line once.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

_LOGGED: set[tuple[str, str]] = set()

# Warnings that Lightning raises about how it was driven, none of which is a fault of the run: alignexp
# trains without a validation loop, logs at its own intervals, and reduces its metrics itself.
LIBRARY_NOTICES = (
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    r".*does not have many workers which may be a bottleneck",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Checkpoint directory .* exists and is not empty",
)
LIBRARY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
LIBRARY_MODULES = r"(lightning|lightning_fabric|pytorch_lightning|transformers|torch|accelerate|peft|deepspeed|datasets|" \
                  r"huggingface_hub|hydra|omegaconf|tokenizers|rouge_score|sacrebleu|matplotlib|tensorboard|wandb|trl)(\..*)?"


def quiet_libraries(verbose: bool = False) -> None:
    """Each line once, and, unless ``verbose``, no library noise (see the module docstring). Idempotent."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):  # their own console handler: the root's prints the line already
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)
    for message in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def emit(text: str) -> None:
    """Print ``text`` (a result table) to the console as it is, and write it to the run's log files too
    (``train.log``: the root logger's file handlers), so that the log holds the result as well."""
    print(text, flush=True)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).exists():
            handler.acquire()
            try:
                handler.stream.write(text + "\n")
                handler.flush()
            finally:
                handler.release()


def log_once(logger: logging.Logger, message: str, *args) -> None:
    """``logger.info(message, *args)`` the first time this process logs that text there (a setting that holds
    for every model a run builds is said once, not once per model)."""
    text = message % args if args else message
    if (logger.name, text) not in _LOGGED:
        _LOGGED.add((logger.name, text))
        logger.info(text)
