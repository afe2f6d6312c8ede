"""Fake ``neuronx_distributed_inference.utils.hf_adapter``: config loading hook and greedy generation adapter."""

from __future__ import annotations

import torch


def load_pretrained_config(model_path_or_name=None, hf_config=None):
    """Like NxDI: exactly one source; the HF config's dict becomes attributes, its dtype the neuron dtype."""

    def load_config(self) -> None:
        if (model_path_or_name is None) == (hf_config is None):
            raise ValueError('Please provide only one of "model_path_or_name" or "hf_config"')
        if model_path_or_name is not None:
            raise NotImplementedError("fake: the MiMo adapter is used with hf_config=")
        config_dict = hf_config.to_dict()
        dtype = config_dict.pop("dtype", None) or config_dict.pop("torch_dtype", None)
        config_dict.pop("torch_dtype", None)
        if dtype is not None and not self.neuron_config.overrides_torch_dtype:
            self.neuron_config.torch_dtype = dtype
        self.__dict__.update(config_dict)

    return load_config


class HuggingFaceGenerationAdapter:
    """``generate(input_ids=, attention_mask=, generation_config=)`` -> prompt + new tokens (greedy)."""

    def __init__(self, model) -> None:
        self.model = model

    def generate(self, input_ids, attention_mask=None, generation_config=None, max_new_tokens=None):
        if not self.model.is_loaded:
            raise RuntimeError("fake NxDI: generate() before load()")
        steps = max_new_tokens or generation_config.max_new_tokens
        rows = []
        masks = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        for row, mask in zip(input_ids, masks, strict=True):
            prompt = row[mask.bool()].tolist()
            rows.append(torch.tensor(prompt + self.model.greedy(prompt, steps)))
        return torch.stack(rows)
