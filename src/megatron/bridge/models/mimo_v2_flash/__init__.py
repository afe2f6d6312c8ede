"""MiMo-V2-Flash for Megatron-Bridge (this repository's implementation; see ``mimo_v2_flash_overlay``)."""

from megatron.bridge.models.mimo_v2_flash.mimo_v2_bridge import MiMoV2Bridge
from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_bridge import MiMoV2FlashBridge
from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import MiMoV2FlashModelProvider
from mimo_v2_flash.config import MiMoV2FlashConfigError

__all__ = ["MiMoV2Bridge", "MiMoV2FlashBridge", "MiMoV2FlashConfigError", "MiMoV2FlashModelProvider"]
