"""The AutoBridge API as RL / training frameworks use it from Python: in-memory config edits reach the provider,
and the provider's defaults are the settings of the host it is built on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mimo_testing import edit_checkpoint

from megatron.bridge.models.mimo_v2_flash import mimo_v2_flash_provider
from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_provider import (
    CPU_MODEL_SETTINGS,
    GPU_MODEL_SETTINGS,
    LOCAL_BACKEND_SETTINGS,
    backend_settings,
)
from mimo_v2_flash.config import FULL_ATTENTION, SLIDING_ATTENTION, MiMoV2FlashConfigError

FULL, SWA = FULL_ATTENTION, SLIDING_ATTENTION
TINY_LAYER_TYPES = (FULL, SWA, SWA, FULL)  # the tiny checkpoint's hybrid_layer_pattern [0, 1, 1, 0]


def _provider(directory: Path, **config_edits):
    """The provider ``AutoBridge`` gives after ``config_edits`` are set on its in-memory HF config."""
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(directory))
    for name, value in config_edits.items():
        setattr(bridge.hf_pretrained.config, name, value)
    return bridge.to_megatron_provider(load_weights=False)


def _rope_parameters(full_theta: float, swa_theta: float, factor: float = 0.334) -> dict:
    entry = lambda theta: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}  # noqa: E731
    return {FULL: entry(full_theta), SWA: entry(swa_theta)}


@pytest.fixture(scope="module")
def hub_only_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with a hub-form config.json only: transformers' native config class refills the native
    fields with its defaults there (full attention at layer 0 only, not the file's [0, 1, 1, 0])."""
    native = ("layer_types", "mlp_layer_types", "rope_parameters", "rms_norm_eps", "sliding_window")
    return edit_checkpoint(
        tiny_hf_dir,
        tmp_path_factory.mktemp("hub_only") / "hf",
        config=lambda cfg: {k: v for k, v in cfg.items() if k not in native},
    )


@pytest.fixture(scope="module")
def native_only_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with the transformers-native fields only where both spellings exist."""
    hub = ("hybrid_layer_pattern", "moe_layer_freq", "rope_theta", "swa_rope_theta", "partial_rotary_factor")
    hub += ("layernorm_epsilon", "sliding_window_size")
    return edit_checkpoint(
        tiny_hf_dir,
        tmp_path_factory.mktemp("native_only") / "hf",
        config=lambda cfg: {k: v for k, v in cfg.items() if k not in hub},
    )


# --- in-memory config edits --------------------------------------------------------------------------------------

HUB_EDITS = [
    ("attention_value_scale", 0.5, "attention_value_scale", 0.5),
    ("num_experts_per_tok", 3, "moe_router_topk", 3),
    ("swa_rope_theta", 20_000.0, "swa_rotary_base", 20_000.0),
    ("rope_theta", 1e6, "rotary_base", 1e6),
    ("layernorm_epsilon", 1e-6, "layernorm_epsilon", 1e-6),
    ("hybrid_layer_pattern", [0, 1, 0, 1], "attention_layer_types", (FULL, SWA, FULL, SWA)),
    ("moe_layer_freq", [0, 0, 1, 1], "moe_layer_freq", [0, 0, 1, 1]),
    ("sliding_window_size", 2, "sliding_window_size", 2),
]
NATIVE_EDITS = [
    ("layer_types", [FULL, SWA, FULL, SWA], "attention_layer_types", (FULL, SWA, FULL, SWA)),
    ("mlp_layer_types", ["dense", "dense", "sparse", "sparse"], "moe_layer_freq", [0, 0, 1, 1]),
    ("rms_norm_eps", 1e-6, "layernorm_epsilon", 1e-6),
    ("rope_parameters", _rope_parameters(5e6, 20_000.0), "swa_rotary_base", 20_000.0),
    ("sliding_window", 3, "sliding_window_size", 2),  # the native field counts the query itself
]


ROPE_HUB_FIELDS = ("rope_theta", "swa_rope_theta")


# A hub RoPE field edited over a file that states RoPE only natively is refused instead (see the test after).
@pytest.mark.parametrize(
    "form, field, value, attribute, expected",
    [
        (form, *edit)
        for form in ("both_spellings", "hub_only", "native_only")
        for edit in HUB_EDITS + NATIVE_EDITS
        if not (form == "native_only" and edit[0] in ROPE_HUB_FIELDS)
    ],
    ids=lambda v: str(v)[:24],
)
def test_an_in_memory_edit_wins_over_config_json(form, field, value, attribute, expected, request):
    directory = request.getfixturevalue({"both_spellings": "tiny_hf_dir"}.get(form, f"{form}_dir"))
    unedited = _provider(directory)
    assert getattr(unedited, attribute) != expected
    provider = _provider(directory, **{field: value})
    assert getattr(provider, attribute) == expected
    # Nothing else moved: the rest of the architecture is the file's.
    assert provider.attention_layer_types == expected if attribute == "attention_layer_types" else TINY_LAYER_TYPES
    assert (provider.rotary_base, provider.kv_channels, provider.num_moe_experts) == (
        expected if attribute == "rotary_base" else 5e6,
        24,
        4,
    )


def test_an_unedited_hub_form_config_keeps_the_file_architecture(hub_only_dir):
    """The native class's refilled defaults are no edit: the file's hub fields stay authoritative."""
    provider = _provider(hub_only_dir)
    assert provider.attention_layer_types == TINY_LAYER_TYPES
    assert (provider.rotary_base, provider.swa_rotary_base, provider.attention_value_scale) == (5e6, 1e4, 0.707)


def test_a_partial_rope_edit_in_the_absent_spelling_is_refused(native_only_dir):
    """The file states RoPE as rope_parameters only: one hub RoPE field cannot say what the others are."""
    with pytest.raises(MiMoV2FlashConfigError, match=r"^swa_rope_theta edited but .* edit rope_parameters instead$"):
        _provider(native_only_dir, swa_rope_theta=20_000.0)


def test_from_hf_pretrained_keyword_overrides_are_honoured(tiny_hf_dir):
    from megatron.bridge import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(str(tiny_hf_dir), num_experts_per_tok=3, dtype=torch.bfloat16)
    provider = bridge.to_megatron_provider(load_weights=False)
    assert provider.moe_router_topk == 3
    assert provider.params_dtype == torch.bfloat16 and provider.bf16


def test_both_spellings_edited_consistently_are_honoured(tiny_hf_dir):
    provider = _provider(tiny_hf_dir, hybrid_layer_pattern=[0, 1, 0, 1], layer_types=[FULL, SWA, FULL, SWA])
    assert provider.attention_layer_types == (FULL, SWA, FULL, SWA)


@pytest.mark.parametrize(
    "edits",
    [
        {"hybrid_layer_pattern": [0, 1, 0, 1], "layer_types": [FULL, FULL, SWA, SWA]},
        {"layernorm_epsilon": 1e-6, "rms_norm_eps": 1e-4},
        {"swa_rope_theta": 20_000.0, "rope_parameters": _rope_parameters(5e6, 30_000.0)},
    ],
    ids=["layer_types", "norm_eps", "rope"],
)
def test_both_spellings_edited_inconsistently_are_refused(tiny_hf_dir, edits):
    with pytest.raises(MiMoV2FlashConfigError, match=r"^[^\n]*disagree[^\n]*$"):
        _provider(tiny_hf_dir, **edits)


def test_an_unsupported_edit_is_refused_not_ignored(tiny_hf_dir):
    with pytest.raises(MiMoV2FlashConfigError, match="scoring_func='softmax' is not supported"):
        _provider(tiny_hf_dir, scoring_func="softmax")


def test_from_hf_config_of_a_directory_honours_edits(tiny_hf_dir):
    from transformers import AutoConfig

    from megatron.bridge import AutoBridge

    config = AutoConfig.from_pretrained(str(tiny_hf_dir))
    config.attention_value_scale = 0.5
    config.layer_types = [FULL, SWA, FULL, SWA]
    provider = AutoBridge.from_hf_config(config).to_megatron_provider(load_weights=False)
    assert provider.attention_value_scale == 0.5
    assert provider.attention_layer_types == (FULL, SWA, FULL, SWA)
    assert provider.kv_channels == 24 and provider.swa_num_query_groups == 2


def test_from_hf_config_without_a_directory(tiny_hf_dir):
    """No file to start from: the in-memory config is all there is."""
    from transformers import AutoConfig

    from megatron.bridge import AutoBridge

    raw = json.loads((tiny_hf_dir / "config.json").read_text())
    config = AutoConfig.for_model(**raw)
    assert not config.name_or_path
    config.num_experts_per_tok = 3
    provider = AutoBridge.from_hf_config(config).to_megatron_provider(load_weights=False)
    assert provider.moe_router_topk == 3 and provider.attention_layer_types == TINY_LAYER_TYPES
    assert provider.mtp_num_layers is None  # no weights, no MTP keys to count


# --- the provider's defaults follow the host ---------------------------------------------------------------------


@pytest.fixture
def cuda_host_with_te(monkeypatch):
    """A CUDA host with TransformerEngine, whatever this one is (nothing here touches a device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mimo_v2_flash_provider, "transformer_engine_usable", lambda: True)


@pytest.fixture
def cuda_host_without_te(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mimo_v2_flash_provider, "transformer_engine_usable", lambda: False)


def _assert_settings(provider, settings: dict) -> None:
    wrong = {k: (getattr(provider, k), v) for k, v in settings.items() if getattr(provider, k) != v}
    assert not wrong, wrong


def test_on_a_cuda_host_with_te_the_provider_is_the_gpu_configuration(tiny_hf_dir, cuda_host_with_te):
    provider = _provider(tiny_hf_dir)
    assert provider.moe_grouped_gemm is True and provider.moe_token_dispatcher_type == "alltoall"
    assert provider.moe_permute_fusion and provider.cross_entropy_loss_fusion
    assert provider.bias_activation_fusion and provider.bias_dropout_fusion and provider.masked_softmax_fusion
    assert provider.use_cpu_initialization is False
    assert provider.use_transformer_engine in (True, None)
    provider.resolve_backend()
    assert provider.use_transformer_engine is True
    _assert_settings(provider, GPU_MODEL_SETTINGS)


def test_on_a_cuda_host_without_te_the_provider_is_the_local_backend(tiny_hf_dir, cuda_host_without_te):
    provider = _provider(tiny_hf_dir)
    provider.resolve_backend()
    assert provider.use_transformer_engine is False and provider.moe_token_dispatcher_type == "alltoall"
    _assert_settings(provider, {k: v for k, v in LOCAL_BACKEND_SETTINGS.items()})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the host without CUDA")
def test_on_this_cpu_host_the_provider_is_the_cpu_configuration(tiny_hf_dir):
    provider = _provider(tiny_hf_dir)
    assert provider.moe_grouped_gemm is False and provider.moe_token_dispatcher_type == "allgather"
    _assert_settings(provider, {**LOCAL_BACKEND_SETTINGS, **CPU_MODEL_SETTINGS})
    provider.resolve_backend()
    assert provider.use_transformer_engine is False


@pytest.mark.parametrize("host", ["cpu", "cuda_host_with_te", "cuda_host_without_te"])
def test_the_provider_defaults_are_backend_settings_auto(host, request):
    """Any construction (not only the bridge's) starts from this host's settings; explicit values win."""
    from megatron.bridge.models.mimo_v2_flash import MiMoV2FlashModelProvider

    if host == "cpu" and torch.cuda.is_available():
        pytest.skip("checks the host without CUDA")
    if host != "cpu":
        request.getfixturevalue(host)
    settings = backend_settings("auto")
    _assert_settings(MiMoV2FlashModelProvider(), {k: v for k, v in settings.items() if k != "use_transformer_engine"})
    explicit = MiMoV2FlashModelProvider(moe_grouped_gemm=False, moe_token_dispatcher_type="flex")
    assert (explicit.moe_grouped_gemm, explicit.moe_token_dispatcher_type) == (False, "flex")
    first, second = MiMoV2FlashModelProvider(), MiMoV2FlashModelProvider()
    if first.recompute_modules is not None:
        assert first.recompute_modules is not second.recompute_modules  # no list shared between providers


def test_choosing_the_local_backend_on_a_te_host_turns_te_only_features_off(tiny_hf_dir, cuda_host_with_te):
    """``use_transformer_engine = False`` alone selects a working local backend (as the GPU device check does)."""
    provider = _provider(tiny_hf_dir)
    provider.recompute_modules = ["core_attn", "moe_act", "mlp"]
    provider.use_transformer_engine = False
    provider.resolve_backend()
    _assert_settings(provider, {k: v for k, v in LOCAL_BACKEND_SETTINGS.items() if k != "recompute_modules"})
    assert provider.recompute_modules == ["core_attn", "mlp"]  # moe_act needs grouped GEMM; the rest stays
    assert provider.moe_token_dispatcher_type == "alltoall" and provider.bias_activation_fusion  # not TE-only


def test_the_recipe_gpu_configuration_includes_the_provider_gpu_settings(tiny_hf_dir, tmp_path):
    """One GPU configuration: what the recipe sets on every host contains the provider's GPU defaults."""
    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_bridge import provider_from_architecture
    from megatron.bridge.models.mimo_v2_flash.mimo_v2_flash_recipe import mimo_v2_flash_finetune_config
    from mimo_v2_flash.config import load_config_dict, parse_architecture

    model = provider_from_architecture(parse_architecture(load_config_dict(tiny_hf_dir)), mtp_num_layers=1)
    cfg = mimo_v2_flash_finetune_config(
        pretrained_checkpoint=tmp_path / "unused",
        dataset_root=tmp_path / "data",
        data_format="chat",
        tokenizer=tiny_hf_dir,
        output_dir=tmp_path / "run",
        model=model,
    )
    assert cfg.model.use_transformer_engine is True
    _assert_settings(cfg.model, GPU_MODEL_SETTINGS)
