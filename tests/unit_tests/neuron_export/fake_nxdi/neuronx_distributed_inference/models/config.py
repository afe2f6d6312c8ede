"""Fake ``neuronx_distributed_inference.models.config``: the config classes with NxDI's checking behaviour.

Mirrors what NxDI does (``models/config.py``): ``InferenceConfig.__init__`` runs ``load_config``, applies
kwargs, then ``validate_config`` asserts every ``get_required_attributes()`` entry exists
(``AssertionError("Config must define [...]")``). ``MoENeuronConfig`` turns ``router_config`` dicts into an object
with ``act_fn`` / ``dtype``. The MoE process-group rule (``moe_tp_degree * moe_ep_degree`` ranks = TP) is checked
at construction, where the real SDK fails when it builds the mesh.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class NeuronConfig:
    """Accepts NxDI's keyword arguments and keeps them as attributes."""

    def __init__(self, **kwargs) -> None:
        self.tp_degree = int(kwargs.pop("tp_degree", 1))
        self.ep_degree = int(kwargs.pop("ep_degree", 1))
        self.batch_size = int(kwargs.pop("batch_size", 1))
        self.seq_len = int(kwargs.pop("seq_len", 128))
        self.logical_nc_config = int(kwargs.pop("logical_nc_config", 1))
        self.save_sharded_checkpoint = bool(kwargs.pop("save_sharded_checkpoint", False))
        self.quantized = bool(kwargs.pop("quantized", False))
        self.overrides_torch_dtype = "torch_dtype" in kwargs
        dtype = kwargs.pop("torch_dtype", torch.bfloat16)
        self.torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        for key, value in kwargs.items():
            setattr(self, key, value)


class MoENeuronConfig(NeuronConfig):
    """MoE additions; ``router_config`` becomes an object like NxDI's ``RouterConfig``."""

    def __init__(self, capacity_factor=None, glu_mlp: bool = True, **kwargs) -> None:
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.glu_mlp = glu_mlp
        self.moe_tp_degree = int(kwargs.pop("moe_tp_degree", 1))
        self.moe_ep_degree = int(kwargs.pop("moe_ep_degree", 1))
        router = kwargs.pop("router_config", None) or {}
        self.router_config = SimpleNamespace(
            act_fn=router.get("act_fn", "softmax"), dtype=router.get("dtype", "float32")
        )
        super().__init__(**kwargs)
        if self.moe_ep_degree > 1 and self.moe_tp_degree * self.moe_ep_degree != self.tp_degree:
            raise ValueError(f"moe_tp_degree x moe_ep_degree must equal tp_degree {self.tp_degree}")


class InferenceConfig:
    """NxDI's construction order: load_config, kwargs, add_derived_config, validate_config."""

    def __init__(self, neuron_config, fused_spec_config=None, load_config=None, metadata=None, **kwargs) -> None:
        self.neuron_config = neuron_config
        self.fused_spec_config = fused_spec_config
        if load_config is not None:
            load_config(self)
        self.metadata = metadata
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.validate_config()

    def get_required_attributes(self) -> list[str]:
        return []

    def validate_config(self) -> None:
        missing_attributes = [x for x in self.get_required_attributes() if not hasattr(self, x)]
        assert len(missing_attributes) == 0, f"Config must define {missing_attributes}"
