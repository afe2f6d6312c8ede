"""Command lines without the frameworks' import-time chatter, undone when the command returns."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

# Loggers that report missing optional packages (Apex, TransformerEngine) at import and set-up.
FRAMEWORK_LOGGERS = (
    "megatron.bridge.utils.import_utils",
    "megatron.core",
    "megatron.bridge",
    "torch.utils.cpp_extension",
)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_framework_logs() -> Iterator[None]:
    """Within the block, Megatron's and modelopt's warnings and sub-error log records are not shown.

    Genuine errors still surface as exceptions or ERROR records. Warning filters and logger levels are
    restored on exit, so nothing outside the block (a caller's own warnings) is hidden.
    """
    loggers = [logging.getLogger(name) for name in FRAMEWORK_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|modelopt)(\..*)?")
        # torch.distributed.checkpoint notes that a single process loads without process groups: intended here.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed\.checkpoint(\..*)?")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
            # import_utils resets its own level to INFO when imported; a filter survives that.
            logger.addFilter(_errors_only)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.removeFilter(_errors_only)
                logger.setLevel(level)
