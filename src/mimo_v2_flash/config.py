"""Read a MiMo-V2-Flash Hugging Face config (hub or transformers-native form) into one normalized view.

Two spellings of the same architecture exist:

* the released hub config (remote code): ``hybrid_layer_pattern`` (0 = full, 1 = SWA), ``moe_layer_freq``,
  ``swa_num_key_value_heads``, ``sliding_window_size`` (previous tokens a query sees), ``rope_theta`` /
  ``swa_rope_theta`` / ``partial_rotary_factor``, ``layernorm_epsilon``, ``add_*_attention_sink_bias``;
* transformers' native ``MiMoV2FlashConfig`` (>= 5.13): ``layer_types``, ``mlp_layer_types``,
  ``rope_parameters`` per layer type, ``rms_norm_eps``, ``sliding_window`` = window + 1 (>= 5.20).

transformers' native config class fills ``layer_types`` / ``rope_parameters`` with defaults when it loads a
hub-form file, silently ignoring the hub fields, so this module reads the raw ``config.json`` dict: hub fields
win when present, and a file carrying both spellings must be self-consistent.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
SPLIT_PROJECTIONS = "split"
FUSED_PROJECTIONS = "fused_qkv"
PROJECTION_LAYOUTS = (SPLIT_PROJECTIONS, FUSED_PROJECTIONS)


class MiMoV2FlashConfigError(ValueError):
    """A config value this implementation cannot represent exactly."""


@dataclass(frozen=True)
class MiMoV2FlashArchitecture:
    """Everything about the architecture the bridge needs, in one spelling."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    head_dim: int
    v_head_dim: int
    full_num_kv_heads: int
    swa_num_kv_heads: int
    layer_types: tuple[str, ...]
    moe_layers: tuple[bool, ...]
    sliding_window_size: int
    full_rope_theta: float
    swa_rope_theta: float
    partial_rotary_factor: float
    norm_eps: float
    attention_value_scale: float | None
    full_attention_sink: bool
    swa_attention_sink: bool
    ffn_hidden_size: int
    moe_ffn_hidden_size: int
    num_experts: int
    moe_topk: int
    routed_scaling_factor: float
    max_position_embeddings: int
    init_method_std: float
    hidden_act: str
    torch_dtype: str | None


def load_config_dict(path: str | Path) -> dict[str, Any]:
    """Load ``config.json`` from a checkpoint directory (or the file itself)."""
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "config.json"
    try:
        return json.loads(config_path.read_text())
    except FileNotFoundError:
        raise MiMoV2FlashConfigError(f"{config_path}: config.json not found") from None
    except json.JSONDecodeError as error:
        raise MiMoV2FlashConfigError(f"{config_path}: not valid JSON ({error})") from None


def _require(cfg: dict[str, Any], *names: str) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    raise MiMoV2FlashConfigError(f"config is missing required field {' / '.join(repr(n) for n in names)}")


def _layer_types(cfg: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    hub = cfg.get("hybrid_layer_pattern")
    native = cfg.get("layer_types")
    from_hub = None
    if hub is not None:
        if any(v not in (0, 1) for v in hub):
            raise MiMoV2FlashConfigError(f"hybrid_layer_pattern must hold 0 (full) or 1 (SWA), got {hub}")
        from_hub = tuple(SLIDING_ATTENTION if v == 1 else FULL_ATTENTION for v in hub)
    if native is not None:
        unknown = sorted(set(native) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise MiMoV2FlashConfigError(f"layer_types: unsupported layer type(s) {unknown}")
        if from_hub is not None and tuple(native) != from_hub:
            raise MiMoV2FlashConfigError("hybrid_layer_pattern and layer_types disagree")
    types = from_hub if from_hub is not None else tuple(native) if native is not None else None
    if types is None:
        raise MiMoV2FlashConfigError("config is missing required field 'hybrid_layer_pattern' / 'layer_types'")
    if len(types) != num_layers:
        raise MiMoV2FlashConfigError(f"layer pattern has {len(types)} entries for num_hidden_layers={num_layers}")
    return types


def _moe_layers(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    freq = cfg.get("moe_layer_freq")
    native = cfg.get("mlp_layer_types")
    if freq is not None:
        if isinstance(freq, int):
            raise MiMoV2FlashConfigError("moe_layer_freq must be a per-layer list of 0/1")
        layers = tuple(bool(v) for v in freq)
        if native is not None and tuple(v == "sparse" for v in native) != layers:
            raise MiMoV2FlashConfigError("moe_layer_freq and mlp_layer_types disagree")
    elif native is not None:
        unknown = sorted(set(native) - {"dense", "sparse"})
        if unknown:
            raise MiMoV2FlashConfigError(f"mlp_layer_types: unsupported value(s) {unknown}")
        layers = tuple(v == "sparse" for v in native)
    else:
        raise MiMoV2FlashConfigError("config is missing required field 'moe_layer_freq' / 'mlp_layer_types'")
    if len(layers) != num_layers:
        raise MiMoV2FlashConfigError(f"MoE layer pattern has {len(layers)} entries for num_hidden_layers={num_layers}")
    return layers


def projection_layout(cfg: dict[str, Any]) -> str:
    """How a checkpoint stores attention projections: ``"split"`` (``q_proj``/``k_proj``/``v_proj``, MiMo-V2-Flash
    and the default) or ``"fused_qkv"`` (one pre-sharded ``qkv_proj``, the MiMo-V2 family; see ``fused_qkv``)."""
    layout = cfg.get("attention_projection_layout") or SPLIT_PROJECTIONS
    if layout not in PROJECTION_LAYOUTS:
        raise MiMoV2FlashConfigError(
            f"attention_projection_layout={layout!r} is not supported (only {' / '.join(PROJECTION_LAYOUTS)})"
        )
    return layout


def _rope(cfg: dict[str, Any]) -> tuple[float, float, float]:
    """Return (full theta, SWA theta, partial rotary factor)."""
    scaling = cfg.get("rope_scaling")
    if scaling not in (None, {}):
        # MiMo-V2.5 states plain RoPE as {"rope_type": "default", "type": "default"}; any other type scales.
        kinds = {scaling.get("rope_type"), scaling.get("type")} - {None} if isinstance(scaling, dict) else None
        if kinds != {"default"}:
            raise MiMoV2FlashConfigError(f"rope_scaling={scaling!r} is not supported (only plain RoPE)")
    if cfg.get("rope_theta") is not None and cfg.get("swa_rope_theta") is not None:
        factor = cfg.get("partial_rotary_factor")
        if factor is None:
            raise MiMoV2FlashConfigError("config is missing required field 'partial_rotary_factor'")
        return float(cfg["rope_theta"]), float(cfg["swa_rope_theta"]), float(factor)
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict) or FULL_ATTENTION not in params:
        raise MiMoV2FlashConfigError(
            "config is missing required field 'rope_theta' + 'swa_rope_theta' / 'rope_parameters'"
        )
    per_type = {}
    for kind in (FULL_ATTENTION, SLIDING_ATTENTION):
        entry = params.get(kind) or params[FULL_ATTENTION]
        if entry.get("rope_type", "default") != "default":
            raise MiMoV2FlashConfigError(f"rope_parameters.{kind}.rope_type={entry['rope_type']!r} is not supported")
        per_type[kind] = (float(entry["rope_theta"]), float(entry.get("partial_rotary_factor", 1.0)))
    if per_type[FULL_ATTENTION][1] != per_type[SLIDING_ATTENTION][1]:
        raise MiMoV2FlashConfigError(
            "rope_parameters: different partial_rotary_factor per layer type is not supported"
        )
    return per_type[FULL_ATTENTION][0], per_type[SLIDING_ATTENTION][0], per_type[FULL_ATTENTION][1]


def _window(cfg: dict[str, Any]) -> int:
    """Previous tokens a sliding-window query attends to (it always sees itself too)."""
    if cfg.get("sliding_window_size") is not None:
        return int(cfg["sliding_window_size"])
    if cfg.get("sliding_window") is not None:
        # transformers >= 5.20 native form stores window + 1 (the query itself included).
        return int(cfg["sliding_window"]) - 1
    raise MiMoV2FlashConfigError("config is missing required field 'sliding_window_size' / 'sliding_window'")


def _check_supported(cfg: dict[str, Any], num_heads: int, head_dim: int, v_head_dim: int) -> None:
    checks = [
        ("scoring_func", cfg.get("scoring_func", "sigmoid"), "sigmoid"),
        ("topk_method", cfg.get("topk_method", "noaux_tc"), "noaux_tc"),
        ("n_group", cfg.get("n_group", 1) or 1, 1),
        ("topk_group", cfg.get("topk_group", 1) or 1, 1),
        ("norm_topk_prob", cfg.get("norm_topk_prob", True), True),
        ("tie_word_embeddings", cfg.get("tie_word_embeddings", False), False),
        ("attention_bias", cfg.get("attention_bias", False), False),
        ("hidden_act", cfg.get("hidden_act", "silu"), "silu"),
    ]
    for name, value, supported in checks:
        if value != supported:
            raise MiMoV2FlashConfigError(f"{name}={value!r} is not supported (only {supported!r})")
    projection_layout(cfg)
    if cfg.get("n_shared_experts"):
        raise MiMoV2FlashConfigError(f"n_shared_experts={cfg['n_shared_experts']!r} is not supported (only 0/null)")
    for name, expected in (("swa_num_attention_heads", num_heads), ("swa_head_dim", head_dim)):
        if cfg.get(name) is not None and cfg[name] != expected:
            raise MiMoV2FlashConfigError(f"{name}={cfg[name]} differs from the full-attention value {expected}")
    if cfg.get("swa_v_head_dim") is not None and cfg["swa_v_head_dim"] != v_head_dim:
        raise MiMoV2FlashConfigError(f"swa_v_head_dim={cfg['swa_v_head_dim']} differs from v_head_dim={v_head_dim}")


def parse_architecture(cfg: dict[str, Any]) -> MiMoV2FlashArchitecture:
    """Normalize a raw MiMo-V2-Flash ``config.json`` dict; unsupported values raise MiMoV2FlashConfigError."""
    num_layers = int(_require(cfg, "num_hidden_layers"))
    num_heads = int(_require(cfg, "num_attention_heads"))
    hidden = int(_require(cfg, "hidden_size"))
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    v_head_dim = int(cfg.get("v_head_dim") or head_dim)
    full_kv = int(_require(cfg, "num_key_value_heads"))
    # transformers' native model hard-codes SWA KV heads = 2 x full KV heads.
    swa_kv = int(cfg.get("swa_num_key_value_heads") or 2 * full_kv)
    _check_supported(cfg, num_heads, head_dim, v_head_dim)
    full_theta, swa_theta, factor = _rope(cfg)
    if not 0.0 < factor <= 1.0 or int(head_dim * factor) % 2:
        raise MiMoV2FlashConfigError(
            f"partial_rotary_factor={factor} gives {int(head_dim * factor)} rotary dims of {head_dim} "
            "(must be even, > 0)"
        )
    for name, kv in (("num_key_value_heads", full_kv), ("swa_num_key_value_heads", swa_kv)):
        if kv <= 0 or num_heads % kv:
            raise MiMoV2FlashConfigError(f"{name}={kv} must divide num_attention_heads={num_heads}")
    sink_full = cfg.get("add_full_attention_sink_bias", False)
    sink_swa = cfg.get("add_swa_attention_sink_bias", True)
    scaling = cfg.get("routed_scaling_factor")
    return MiMoV2FlashArchitecture(
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=int(_require(cfg, "vocab_size")),
        num_attention_heads=num_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        full_num_kv_heads=full_kv,
        swa_num_kv_heads=swa_kv,
        layer_types=_layer_types(cfg, num_layers),
        moe_layers=_moe_layers(cfg, num_layers),
        sliding_window_size=_window(cfg),
        full_rope_theta=full_theta,
        swa_rope_theta=swa_theta,
        partial_rotary_factor=factor,
        norm_eps=float(_require(cfg, "layernorm_epsilon", "rms_norm_eps")),
        attention_value_scale=cfg.get("attention_value_scale"),
        full_attention_sink=bool(sink_full),
        swa_attention_sink=bool(sink_swa),
        ffn_hidden_size=int(_require(cfg, "intermediate_size")),
        moe_ffn_hidden_size=int(cfg.get("moe_intermediate_size") or 0),
        num_experts=int(cfg.get("n_routed_experts") or cfg.get("num_local_experts") or 0),
        moe_topk=int(cfg.get("num_experts_per_tok") or 0),
        routed_scaling_factor=1.0 if scaling is None else float(scaling),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        init_method_std=float(cfg.get("initializer_range") or 0.02),
        hidden_act="silu",
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


# Each architecture value that has both spellings: (hub fields, transformers-native fields).
SPELLINGS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("hybrid_layer_pattern",), ("layer_types",)),
    (("moe_layer_freq",), ("mlp_layer_types",)),
    (("rope_theta", "swa_rope_theta", "partial_rotary_factor"), ("rope_parameters",)),
    (("layernorm_epsilon",), ("rms_norm_eps",)),
    (("sliding_window_size",), ("sliding_window",)),
    (("torch_dtype",), ("dtype",)),
)


def config_edits(current: dict[str, Any], loaded: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What was changed in memory: ``(edited fields, removed fields)`` of ``current`` (an HF config's ``to_dict``)
    against ``loaded`` (the same class freshly loaded from the same directory).

    Both went through the same config class, so its defaults and dropped fields cancel out and only the caller's
    changes (attribute edits, keyword overrides at load time) remain. Private and version bookkeeping is no edit.
    """

    def bookkeeping(name: str) -> bool:
        return name.startswith("_") or name == "transformers_version"

    edits = {k: v for k, v in current.items() if not bookkeeping(k) and (k not in loaded or loaded[k] != v)}
    removed = [k for k in loaded if k not in current and not bookkeeping(k)]
    return edits, removed


def apply_config_edits(raw: dict[str, Any], edits: dict[str, Any], removed: Collection[str] = ()) -> dict[str, Any]:
    """``raw`` (a ``config.json`` dict) with in-memory edits applied, in either spelling.

    :func:`parse_architecture` reads the hub spelling where present, so an edit in one spelling takes the other
    spelling's fields out; an edit made in both spellings must describe the same architecture. An edit that
    cannot be honoured raises :class:`MiMoV2FlashConfigError` rather than being ignored.
    """
    cfg = {k: v for k, v in raw.items() if k not in removed}
    cfg.update(edits)
    edited_both = []
    for hub, native in SPELLINGS:
        hub_edited, native_edited = any(n in edits for n in hub), any(n in edits for n in native)
        if hub_edited and native_edited:
            edited_both.append((hub, native))
        elif hub_edited or native_edited:
            edited, stale = (hub, native) if hub_edited else (native, hub)
            missing = [n for n in edited if cfg.get(n) is None]
            if missing:
                # Reading the other spelling would ignore the edit.
                raise MiMoV2FlashConfigError(
                    f"{' / '.join(n for n in edited if n in edits)} edited but {', '.join(missing)} not set: "
                    f"edit {' / '.join(stale)} instead"
                )
            for name in stale:
                cfg.pop(name, None)
    for hub, native in edited_both:
        as_hub = parse_architecture({k: v for k, v in cfg.items() if k not in native})
        as_native = parse_architecture({k: v for k, v in cfg.items() if k not in hub})
        if as_hub != as_native:
            raise MiMoV2FlashConfigError(f"edited {' / '.join(hub)} and {' / '.join(native)} disagree")
    return cfg


def architecture_fields(arch: MiMoV2FlashArchitecture) -> dict[str, Any]:
    """Every architecture field in hub spelling, the SWA ones included.

    Serving stacks read many of these without a default (vLLM's and SGLang's MiMo-V2 model files read e.g.
    ``swa_num_attention_heads``, ``swa_head_dim``, ``sliding_window_size``, ``attention_bias``; SGLang's KV-cache
    sizing reads ``swa_v_head_dim``), and some defaults would be wrong here (``swa_v_head_dim`` falls back to
    ``swa_head_dim``), so a written config states all of them.
    """
    return {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "moe_intermediate_size": arch.moe_ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.full_num_kv_heads,
        "head_dim": arch.head_dim,
        "v_head_dim": arch.v_head_dim,
        "swa_num_attention_heads": arch.num_attention_heads,
        "swa_num_key_value_heads": arch.swa_num_kv_heads,
        "swa_head_dim": arch.head_dim,
        "swa_v_head_dim": arch.v_head_dim,
        "hybrid_layer_pattern": [int(t == SLIDING_ATTENTION) for t in arch.layer_types],
        "moe_layer_freq": [int(v) for v in arch.moe_layers],
        "sliding_window_size": arch.sliding_window_size,
        "rope_theta": arch.full_rope_theta,
        "swa_rope_theta": arch.swa_rope_theta,
        "partial_rotary_factor": arch.partial_rotary_factor,
        "layernorm_epsilon": arch.norm_eps,
        "attention_value_scale": arch.attention_value_scale,
        "add_full_attention_sink_bias": arch.full_attention_sink,
        "add_swa_attention_sink_bias": arch.swa_attention_sink,
        "n_routed_experts": arch.num_experts,
        "num_experts_per_tok": arch.moe_topk,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": arch.hidden_act,
    }


def with_native_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with every architecture field in hub spelling (those it lacks filled in from what it states) and
    the matching transformers-native fields (what transformers >= 5.20 reads)."""
    cfg = dict(cfg)
    for name, value in architecture_fields(parse_architecture(cfg)).items():
        if cfg.get(name) is None:
            cfg[name] = value
    cfg.setdefault("pad_token_id", None)  # SGLang reads it without a default
    rope = lambda theta: {  # noqa: E731
        "rope_type": "default",
        "rope_theta": theta,
        "partial_rotary_factor": cfg["partial_rotary_factor"],
    }
    return {
        **cfg,
        "layer_types": [SLIDING_ATTENTION if v else FULL_ATTENTION for v in cfg["hybrid_layer_pattern"]],
        "mlp_layer_types": ["sparse" if v else "dense" for v in cfg["moe_layer_freq"]],
        "rope_parameters": {FULL_ATTENTION: rope(cfg["rope_theta"]), SLIDING_ATTENTION: rope(cfg["swa_rope_theta"])},
        "rms_norm_eps": cfg["layernorm_epsilon"],
        "sliding_window": cfg["sliding_window_size"] + 1,
    }


def released_config() -> dict[str, Any]:
    """The released XiaomiMiMo/MiMo-V2-Flash architecture (hub form), for planning without the checkpoint."""
    full_layers = {0, 5, 11, 17, 23, 29, 35, 41, 47}
    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": 152576,
        "hidden_size": 4096,
        "intermediate_size": 16384,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "swa_num_attention_heads": 64,
        "swa_num_key_value_heads": 8,
        "head_dim": 192,
        "v_head_dim": 128,
        "swa_head_dim": 192,
        "swa_v_head_dim": 128,
        "attention_bias": False,
        "hybrid_layer_pattern": [0 if i in full_layers else 1 for i in range(48)],
        "moe_layer_freq": [0] + [1] * 47,
        "sliding_window_size": 128,
        "rope_theta": 5_000_000.0,
        "swa_rope_theta": 10_000.0,
        "partial_rotary_factor": 0.334,
        "layernorm_epsilon": 1e-5,
        "attention_value_scale": 0.707,
        "add_full_attention_sink_bias": False,
        "add_swa_attention_sink_bias": True,
        "n_routed_experts": 256,
        "num_experts_per_tok": 8,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "max_position_embeddings": 262144,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


def released_family_configs() -> dict[str, dict[str, Any]]:
    """The released text-backbone architectures by model name, for planning without a checkpoint.

    MiMo-V2.5 and V2.5-Pro from their config.json files (shared/reference/mimo_v2_family_facts.md). Pro's
    ``moe_intermediate_size`` 2048 is the value that gives its stated 1.02T total / 42B active parameters;
    its ``intermediate_size`` (dense layer 0 and the MTP layers only, under 1% of the total) is assumed equal to
    V2-Flash's.
    """
    flash = released_config()
    v25 = dict(
        flash,
        architectures=["MiMoV2ForCausalLM"],
        model_type="mimo_v2",
        attention_projection_layout=FUSED_PROJECTIONS,
        rope_theta=10_000_000.0,
        max_position_embeddings=1048576,
    )
    pro_full_layers = {0, 7, 15, 23, 31, 39, 47, 55, 62, 69}
    pro = dict(
        v25,
        hidden_size=6144,
        num_hidden_layers=70,
        num_attention_heads=128,
        swa_num_attention_heads=128,
        num_key_value_heads=8,
        swa_num_key_value_heads=8,
        hybrid_layer_pattern=[0 if i in pro_full_layers else 1 for i in range(70)],
        moe_layer_freq=[0] + [1] * 69,
        n_routed_experts=384,
        attention_value_scale=0.612,
    )
    return {"MiMo-V2-Flash": flash, "MiMo-V2.5": v25, "MiMo-V2.5-Pro": pro}
