"""Check a TP / PP / EP / ETP / CP layout against a MiMo-V2-Flash architecture before anything is built.

Each violation raises :class:`MiMoV2FlashConfigError` saying what to change. KV heads are replicated when TP
exceeds a layer's KV head count (Megatron-Core gathers the fused QKV and each rank keeps its group), which needs
TP to be a multiple of that count.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re

from mimo_v2_flash.config import FULL_ATTENTION, MiMoV2FlashArchitecture, MiMoV2FlashConfigError

TE_CONTEXT_PARALLEL_MIN_VERSION = (2, 16)
"""TE 2.16 (TE #2719) runs ``a2a`` / ``all_gather`` context parallelism with a Q/K head dim different from V's;
before it such a layer could only use ``p2p``, which runs neither windows nor learnable sinks."""


def te_context_parallel_comm_type(window: bool, sink: bool) -> str:
    """TransformerEngine's ``cp_comm_type`` for a MiMo layer kind.

    TE runs a learnable sink only with ``a2a`` (heads split over the CP ranks, the sink with them) and a sliding
    window only with ``a2a`` or ``all_gather``; a causal layer with neither takes ``p2p``, which keeps every head on
    every rank and so fits any head count (full-attention layers: 4 KV heads, one per rank at TP 4).
    """
    return "a2a" if window or sink else "p2p"


def transformer_engine_version() -> tuple[int, int] | None:
    """(major, minor) of the installed TransformerEngine, read from package metadata (TE is not imported)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for distribution in ("transformer_engine", "transformer-engine-cu13", "transformer-engine-cu12"):
        try:
            found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(distribution))
        except importlib.metadata.PackageNotFoundError:
            continue
        if found:
            return int(found.group(1)), int(found.group(2))
    return None


def _kv_heads_fit(kind: str, kv_heads: int, tp: int) -> None:
    if kv_heads >= tp and kv_heads % tp:
        raise MiMoV2FlashConfigError(f"--tp {tp} does not divide the {kv_heads} KV heads of {kind} layers")
    if kv_heads < tp and tp % kv_heads:
        raise MiMoV2FlashConfigError(
            f"--tp {tp} exceeds the {kv_heads} KV heads of {kind} layers and is not a multiple of it "
            "(KV heads are replicated across ranks)"
        )


def check_parallel_layout(
    arch: MiMoV2FlashArchitecture | None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    cp: int = 1,
    world_size: int | None = None,
    seq_length: int | None = None,
    transformer_engine: bool = False,
    te_version: tuple[int, int] | None = None,
) -> None:
    """Raise with an actionable message if the layout cannot run this model (``arch=None``: sizes only).

    Context parallelism (``cp``) splits each sequence into ``2 * cp`` chunks (Megatron's load-balanced split), so
    ``seq_length`` must divide by ``2 * cp``. With TransformerEngine (``transformer_engine``) it also needs TE >=
    2.16 and, on every layer kind that runs ``a2a`` (:func:`te_context_parallel_comm_type`), each rank's query and
    KV head counts divisible by ``cp``. ``te_version``: the TE to check against (a plan for GPUs elsewhere);
    by default the one installed here.
    """
    etp = tp if etp is None else etp
    for name, value in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--etp", etp), ("--cp", cp)):
        if value < 1:
            raise MiMoV2FlashConfigError(f"{name} must be >= 1, got {value}")
    if cp > 1 and seq_length is not None and seq_length % (2 * cp):
        raise MiMoV2FlashConfigError(
            f"--cp {cp}: the sequence length {seq_length} must be divisible by 2 x cp = {2 * cp} (each rank holds "
            "two of the 2 x cp chunks)"
        )
    if cp > 1 and transformer_engine:
        _check_te_context_parallel(arch, tp, cp, te_version or transformer_engine_version())
    if arch is not None:
        _check_model_fits(arch, tp, pp, ep, etp)
    if world_size is not None:
        _check_world_size(world_size, tp, pp, ep, etp, cp)


def _check_te_context_parallel(arch, tp: int, cp: int, version: tuple[int, int] | None) -> None:
    if version is None:
        raise MiMoV2FlashConfigError(
            f"--cp {cp} on the TransformerEngine backend: TransformerEngine is not installed (or train on the local "
            "attention: finetune.sh --backend local)"
        )
    head_dims_differ = arch is None or arch.head_dim != arch.v_head_dim
    if head_dims_differ and version < TE_CONTEXT_PARALLEL_MIN_VERSION:
        minimum = ".".join(map(str, TE_CONTEXT_PARALLEL_MIN_VERSION))
        raise MiMoV2FlashConfigError(
            f"--cp {cp} on TransformerEngine {version[0]}.{version[1]}: MiMo's sliding-window layers (window and "
            f"learnable sink) need cp_comm_type a2a, which TE runs with a Q/K head dim different from V's only from "
            f"TE {minimum} (TE #2719); upgrade TransformerEngine, or train on the local attention (finetune.sh "
            "--backend local)"
        )
    if arch is None:
        return
    for kind, kv_heads, window, sink in _layer_kinds(arch):
        if te_context_parallel_comm_type(window, sink) != "a2a":
            continue
        heads = (("query", arch.num_attention_heads), ("KV", kv_heads))
        for what, total in heads:
            per_rank = max(total // tp, 1)  # KV heads are replicated when TP exceeds them
            if per_rank % cp:
                needs = "window and sink" if window and sink else "window" if window else "sink"
                raise MiMoV2FlashConfigError(
                    f"--cp {cp} on TransformerEngine: {kind} layers run cp_comm_type a2a (their {needs} need it), "
                    f"which splits each rank's heads over the CP ranks, but a rank holds {per_rank} {what} head(s) "
                    f"({total} / --tp {tp}); --cp must divide that (lower --tp or --cp)"
                )


def _layer_kinds(arch) -> list[tuple[str, int, bool, bool]]:
    """(name, KV heads, window, sink) of each attention kind the model has; MTP layers are sliding-window."""
    kinds = [("sliding-window", arch.swa_num_kv_heads, arch.sliding_window_size > 0, arch.swa_attention_sink)]
    if FULL_ATTENTION in arch.layer_types:
        kinds.insert(0, ("full-attention", arch.full_num_kv_heads, False, arch.full_attention_sink))
    return kinds


def _check_model_fits(arch, tp: int, pp: int, ep: int, etp: int) -> None:
    if arch.num_attention_heads % tp:
        raise MiMoV2FlashConfigError(f"--tp {tp} does not divide num_attention_heads={arch.num_attention_heads}")
    _kv_heads_fit("full-attention", arch.full_num_kv_heads, tp)
    _kv_heads_fit("sliding-window", arch.swa_num_kv_heads, tp)
    if arch.vocab_size % tp:
        raise MiMoV2FlashConfigError(f"--tp {tp} does not divide vocab_size={arch.vocab_size}")
    if arch.ffn_hidden_size % tp:
        raise MiMoV2FlashConfigError(f"--tp {tp} does not divide intermediate_size={arch.ffn_hidden_size}")
    if arch.num_layers % pp:
        raise MiMoV2FlashConfigError(f"--pp {pp} does not divide num_hidden_layers={arch.num_layers}")
    if any(arch.moe_layers):
        if arch.num_experts % ep:
            raise MiMoV2FlashConfigError(f"--ep {ep} does not divide the {arch.num_experts} experts")
        if arch.moe_ffn_hidden_size % etp:
            raise MiMoV2FlashConfigError(
                f"--etp {etp} does not divide moe_intermediate_size={arch.moe_ffn_hidden_size}"
            )


def _check_world_size(world_size: int, tp: int, pp: int, ep: int, etp: int, cp: int) -> None:
    if world_size % (tp * pp * cp):
        raise MiMoV2FlashConfigError(
            f"{world_size} process(es) are not a multiple of tp*pp*cp = {tp * pp * cp} "
            "(launch with torchrun --nproc-per-node matching the layout)"
        )
    if world_size % (etp * ep * pp):
        raise MiMoV2FlashConfigError(
            f"{world_size} process(es) are not a multiple of etp*ep*pp = {etp * ep * pp} (lower --etp or --ep)"
        )
