"""Describe a MiMo-V2-Flash checkpoint from its config and safetensors headers only, listing every problem.

Works on the hub layout (the release, a ``convert_checkpoints.py export`` output) and on a ``prepare`` output
(NxDI layout). No tensor data is read. Problems are collected rather than raised, so one run lists them all.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mimo_v2_flash import config as mimo_config
from mimo_v2_flash.checkpoint import fp8 as fp8_checkpoint
from mimo_v2_flash.checkpoint import hf_checkpoint, mxfp4, validation
from neuron_export import nxdi_contract

MTP_LAYER = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
HUB, PREPARED = "hub", "nxdi-prepared"


@dataclass
class Inspection:
    """What ``inspect`` reports (JSON-serializable except ``arch``)."""

    path: str
    layout: str = "unknown"
    format: str = "unknown"
    model_type: str | None = None
    num_layers: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)
    mtp_layers: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    tensors: int = 0
    shards: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    arch: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("arch")
        return data


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _format(bytes_by_dtype: dict[str, int]) -> str:
    floats = {k: v for k, v in bytes_by_dtype.items() if k.startswith(("float", "bfloat"))}
    if any(k.startswith("float8") for k in floats):
        return "FP8"
    if not floats:
        return "unknown"
    main = max(floats, key=floats.get)
    return {"bfloat16": "BF16", "float32": "FP32", "float16": "FP16"}.get(main, main)


def mtp_layer_count(names: list[str]) -> tuple[int, str | None]:
    """Number of MTP layers (highest index + 1) and a problem if they are not numbered 0..N-1."""
    indices = {int(m.group(1)) for n in names if (m := MTP_LAYER.match(n))}
    if indices and indices != set(range(max(indices) + 1)):
        return len(indices), f"MTP layers are not numbered 0..N-1 (found {sorted(indices)})"
    return len(indices), None


def inspect_checkpoint(directory: str | Path) -> Inspection:
    """Inspect ``directory``; never raises for checkpoint problems (they end up in ``problems``)."""
    report = Inspection(path=str(directory))
    try:
        ckpt = hf_checkpoint.HFCheckpoint(directory)
        config = ckpt.config
    except hf_checkpoint.CheckpointError as error:
        report.problems.append(str(error))
        return report
    names = ckpt.keys()
    report.tensors, report.shards = len(names), len(ckpt.headers)
    for name in names:
        key = _dtype_name(ckpt.dtype(name))
        report.bytes_by_dtype[key] = report.bytes_by_dtype.get(key, 0) + ckpt.nbytes(name)
    report.format = _format(report.bytes_by_dtype)
    report.model_type = config.get("model_type")
    identity = nxdi_contract.identity_problem(config)
    if identity:
        report.problems.append(f"{ckpt.directory / 'config.json'}: {identity}")
        return report
    _check_tensors(ckpt, config, report)
    return report


def _architecture(ckpt, config: dict, report: Inspection):
    try:
        arch = mimo_config.parse_architecture(config)
    except mimo_config.MiMoV2FlashConfigError as error:
        report.problems.append(f"{ckpt.directory / 'config.json'}: {error}")
        return None
    report.arch, report.num_layers = arch, arch.num_layers
    report.num_experts, report.experts_per_token = arch.num_experts, arch.moe_topk
    report.layers = [
        {
            "index": i,
            "attention": "full" if kind == mimo_config.FULL_ATTENTION else "sliding",
            "mlp": "moe" if moe else "dense",
        }
        for i, (kind, moe) in enumerate(zip(arch.layer_types, arch.moe_layers, strict=True))
    ]
    report.problems += [f"{ckpt.directory / 'config.json'}: {p}" for p in nxdi_contract.unsupported_by_adapter(arch)]
    return arch


def _is_mxfp4(ckpt, name: str) -> bool:
    """An MXFP4 weight (MiMo-V2.6-Flash experts): ``uint8`` with a ``uint8`` ``<name>_scale``."""
    scale = mxfp4.scale_name(name)
    return ckpt.dtype(name) == torch.uint8 and scale in ckpt and ckpt.dtype(scale) == torch.uint8


def _logical_shape(ckpt, name: str) -> tuple[int, ...]:
    shape = ckpt.shape(name)
    return (*shape[:-1], 2 * shape[-1]) if _is_mxfp4(ckpt, name) else shape


def _check_tensors(ckpt, config: dict, report: Inspection) -> None:
    arch = _architecture(ckpt, config, report)
    towers = set(validation.tower_tensors(ckpt.keys()))
    mxfp4_scales = {mxfp4.scale_name(n) for n in ckpt.keys() if _is_mxfp4(ckpt, n)}
    scales = [n for n in ckpt.keys() if n.endswith(fp8_checkpoint.SCALE_SUFFIX) and n not in towers]
    weights = [
        n for n in ckpt.keys() if not n.endswith(fp8_checkpoint.SCALE_SUFFIX) and n not in towers | mxfp4_scales
    ]
    prepared = any(nxdi_contract.hub_name(n) != n for n in weights)
    report.layout = PREPARED if prepared else HUB
    report.mtp_layers, numbering = mtp_layer_count(weights)
    if numbering:
        report.problems.append(f"{ckpt.directory}: {numbering}")
    _check_fp8_pairs(ckpt, config, set(weights), scales, report)
    if prepared:
        report.problems += [f"{ckpt.directory / 'config.json'}: {p}" for p in nxdi_contract.config_problems(config)]
        if report.mtp_layers:
            report.problems.append(
                f"{ckpt.directory}: MTP tensors (model.mtp.*) in a prepared checkpoint; NxDI has no MTP"
            )
        mtp_index = ckpt.directory / nxdi_contract.MTP_DIR / "model.safetensors.index.json"
        if mtp_index.is_file():
            report.mtp_layers = mtp_layer_count(list(hf_checkpoint.HFCheckpoint(mtp_index.parent).keys()))[0]
    if arch is None:
        return
    try:
        fused = mimo_config.projection_layout(config) == mimo_config.FUSED_PROJECTIONS
    except mimo_config.MiMoV2FlashConfigError:
        fused = False  # reported by _architecture
    expected = validation.expected_tensors(arch, 0 if prepared else report.mtp_layers, fused and not prepared)
    stored_names = set()
    for name, shape in expected.items():
        stored = nxdi_contract.prepared_name(name) if prepared else name
        stored_names.add(stored)
        if stored not in ckpt:
            report.problems.append(f"{ckpt.directory}: tensor {stored} is missing (required by config.json)")
            continue
        where = f"{ckpt.file_of(stored)}: tensor {stored}"
        if _logical_shape(ckpt, stored) != shape:
            report.problems.append(f"{where} has shape {_logical_shape(ckpt, stored)}, config.json implies {shape}")
        dtype = _dtype_name(ckpt.dtype(stored))
        if prepared and dtype != nxdi_contract.output_dtype_name(stored):
            report.problems.append(
                f"{where} has dtype {dtype}, NxDI's BF16 path expects {nxdi_contract.output_dtype_name(stored)}"
            )
        elif not dtype.startswith(("float", "bfloat")) and not _is_mxfp4(ckpt, stored):
            report.problems.append(f"{where} has dtype {dtype} (not a floating-point weight)")
    report.problems += [
        f"{ckpt.file_of(n)}: unexpected tensor {n} (unknown layout)"
        for n in sorted(set(weights) - stored_names)
        if not (prepared and nxdi_contract.is_mtp(n))
    ]


def _check_fp8_pairs(ckpt, config: dict, weights: set[str], scales: list[str], report: Inspection) -> None:
    block = (config.get("quantization_config") or {}).get("weight_block_size")
    for scale in scales:
        if scale[: -len(fp8_checkpoint.SCALE_SUFFIX)] not in weights:
            report.problems.append(f"{ckpt.file_of(scale)}: scale {scale} has no weight")
    for name in sorted(weights):
        if ckpt.dtype(name) != fp8_checkpoint.FP8_DTYPE:
            continue
        if name + fp8_checkpoint.SCALE_SUFFIX not in ckpt:
            report.problems.append(f"{ckpt.file_of(name)}: FP8 weight {name} has no {fp8_checkpoint.SCALE_SUFFIX}")
        if len(ckpt.shape(name)) != 2:
            report.problems.append(f"{ckpt.file_of(name)}: FP8 weight {name} is not 2-D")
    if any(ckpt.dtype(n) == fp8_checkpoint.FP8_DTYPE for n in weights) and not block:
        report.problems.append(
            f"{ckpt.directory / 'config.json'}: FP8 weights but no quantization_config.weight_block_size"
        )
