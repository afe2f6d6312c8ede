"""Check a TP / PP / EP / ETP / CP layout against a MiMo-V2-Flash architecture before anything is built.

Each violation raises :class:`MiMoV2FlashConfigError` saying what to change. KV heads are replicated when TP
exceeds a layer's KV head count (Megatron-Core gathers the fused QKV and each rank keeps its group), which needs
TP to be a multiple of that count.
"""

from __future__ import annotations

from mimo_v2_flash.config import MiMoV2FlashArchitecture, MiMoV2FlashConfigError


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
) -> None:
    """Raise with an actionable message if the layout cannot run this model (``arch=None``: sizes only).

    Context parallelism (``cp``) splits each sequence into ``2 * cp`` chunks (Megatron's load-balanced split), so
    ``seq_length`` must divide by ``2 * cp``; it runs on the local attention backend (``transformer_engine``:
    the TE backend is asked for, where MiMo's CP is not implemented yet).
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
        raise MiMoV2FlashConfigError(
            f"--cp {cp} runs on the local attention backend only (--backend local): MiMo context parallelism on "
            "TransformerEngine (a2a for the sliding-window layers' sinks, TE >= 2.16) is not implemented yet"
        )
    if arch is not None:
        _check_model_fits(arch, tp, pp, ep, etp)
    if world_size is not None:
        _check_world_size(world_size, tp, pp, ep, etp, cp)


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
