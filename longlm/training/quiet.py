"""Known noise, silenced in longlm's own entry points (pretrain, fine-tune, quickstart), message by message.

Each entry is a message that says nothing about the user's run: an advertisement, a deprecation inside a
library we pin, a notice that a CPU machine is a CPU machine. Anything else still prints, and a library
user who imports longlm sees every message the libraries print.
"""
from __future__ import annotations

import logging
import warnings

# (logger, text the record contains)
LOG_NOISE = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),  # "Tip: ... try installing litlogger"
    ("DeepSpeed", "Setting accelerator to CPU"),  # deepspeed's import on a machine without a GPU
)
# messages (regexes) of deprecation warnings raised inside pinned libraries, not by our calls
WARNING_NOISE = (
    r".*isinstance\(treespec, LeafSpec\).* is deprecated",  # lightning's _pytree under torch >= 2.10
)


class _DropContaining(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_known_noise() -> None:
    """Install the filters (idempotent: a filter already on a logger is not added twice)."""
    for name, text in LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropContaining) and f.text == text for f in logger.filters):
            logger.addFilter(_DropContaining(text))
    for message in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message)
