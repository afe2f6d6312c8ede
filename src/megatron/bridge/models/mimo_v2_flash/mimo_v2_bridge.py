"""Megatron-Bridge bridge for the MiMo-V2 family (``MiMoV2ForCausalLM`` / ``mimo_v2``: MiMo-V2.5, V2.5-Pro,
V2.6-Flash), whose text backbone is MiMo-V2-Flash's math with a fused, pre-sharded ``qkv_proj``.

transformers has no ``mimo_v2`` model and the checkpoints' ``auto_map`` names remote code, which is never run:
a plain config class is registered for the model type (as upstream does for other hub-only models), the bridge
reads the raw ``config.json`` itself, and ``trust_remote_code`` is neither needed nor used.
"""

from __future__ import annotations

from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge
from megatron.core.models.gpt.gpt_model import GPTModel
from transformers import AutoConfig, PretrainedConfig

from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_bridge import MiMoV2FlashBridge
from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import MiMoV2FlashModelProvider

MIMO_V2_MODEL_TYPE = "mimo_v2"


class MiMoV2Config(PretrainedConfig):
    """The family's ``config.json`` as read by transformers: its fields kept as attributes, no defaults added."""

    model_type = MIMO_V2_MODEL_TYPE

    def __init__(self, rope_scaling: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        # Kept as given for ``to_dict`` (the bridge refuses anything but plain RoPE): transformers would drop it
        # with a warning, and its deprecated ``rope_scaling`` setter rewrites ``rope_parameters``.
        self.__dict__["rope_scaling"] = rope_scaling


AutoConfig.register(MIMO_V2_MODEL_TYPE, MiMoV2Config, exist_ok=True)


@MegatronModelBridge.register_bridge(
    source="MiMoV2ForCausalLM",
    target=GPTModel,
    provider=MiMoV2FlashModelProvider,
    model_type=MIMO_V2_MODEL_TYPE,
)
class MiMoV2Bridge(MiMoV2FlashBridge):
    """HF MiMo-V2 family text backbone <-> Megatron-Core GPT with MiMo attention (same mappings and provider)."""
