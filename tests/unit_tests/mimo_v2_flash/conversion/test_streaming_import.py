"""The streaming import: parameters are computed ahead within a byte budget, in the announced order."""

from __future__ import annotations

import torch

from mimo_v2_flash.conversion.streaming_import import ParameterMaterializer


class _FillMapping:
    """Maps parameter ``i.weight`` to a tensor filled with ``i`` (stands in for an HF -> Megatron mapping)."""

    def __init__(self, name: str, shape) -> None:
        self.hf_param = (int(name.split(".")[0]), tuple(shape))

    def hf_to_megatron(self, hf_weights, module):
        return hf_weights


class _FillBridge:
    def __init__(self, model) -> None:
        self.model = model
        self.computed: list[int] = []

    def mapping_registry(self):
        shapes = dict(self.model.named_parameters())
        return type("Registry", (), {"megatron_to_hf_lookup": lambda _, n: _FillMapping(n, shapes[n].shape)})()

    def maybe_modify_loaded_hf_weight(self, hf_param, hf_state):
        index, shape = hf_param
        self.computed.append(index)
        return torch.full(shape, float(index))


def test_materializer_computes_ahead_within_its_byte_budget_and_serves_any_order():
    rows = [2, 8, 1, 1, 1, 6, 1]  # 4 columns of fp32: 16 bytes per row
    model = torch.nn.ModuleList(torch.nn.Linear(4, r, bias=False, device="meta") for r in rows)
    bridge = _FillBridge(model)
    materializer = ParameterMaterializer(model, bridge, hf_state=None, ahead_bytes=3 * 16)
    views = [p for _, p in model.named_parameters()]
    materializer.expect(views)
    try:
        assert list(materializer._pending) == ["0.weight"]  # started before the first request (1.weight: over budget)
        for index, view in enumerate(views):
            value = materializer(view)
            assert torch.equal(value, torch.full((rows[index], 4), float(index)))
            pending = [int(name.split(".")[0]) for name in materializer._pending]
            ahead = sum(rows[i] * 16 for i in pending)
            assert pending == list(range(index + 1, index + 1 + len(pending)))  # the next ones, in order
            assert len(pending) == (index + 1 < len(rows)) or ahead <= 3 * 16
        assert sorted(bridge.computed) == list(range(len(rows)))
        # Out of the announced order: still the right values.
        assert torch.equal(materializer(views[1]), torch.full((8, 4), 1.0))
        assert torch.equal(materializer(views[0]), torch.full((2, 4), 0.0))
    finally:
        materializer.close()
