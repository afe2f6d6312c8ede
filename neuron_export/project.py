"""What ``neuron_export`` shares with the MiMo-V2-Flash project package: its user-facing error types."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are expected, user-facing problems (reported as one line, exit code 2)."""
    from mimo_v2_flash.checkpoint.hf_checkpoint import CheckpointError
    from mimo_v2_flash.config import MiMoV2FlashConfigError
    from neuron_export.errors import ExportError

    return ExportError, CheckpointError, MiMoV2FlashConfigError
