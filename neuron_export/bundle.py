"""The ready-to-run bundle ``compile`` writes into the compiled path: layout, scripts for the trn2 host.

Files: ``neuron_export_layout.json`` (the layout), ``nxdi_compile_and_smoke.py`` (a copy of the backend),
``run_on_trn2.sh`` (compile + smoke generation in the NxDI venv), ``serve_vllm.sh`` (vllm-neuron OpenAI server),
``vllm_adapter_shim/modeling_mimo_v2.py`` (the adapter plus its router-bias fix, for vllm-neuron) and
``README.txt``. Paths can be overridden with environment variables when the files move to another host.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from neuron_export.layout import Layout
from neuron_export.neuron_sdk import ADAPTER_ENV, BACKEND_SCRIPT

LAYOUT_NAME = "neuron_export_layout.json"
BACKEND_NAME = "nxdi_compile_and_smoke.py"
NXDI_VENV = "/opt/aws_neuronx_venv_pytorch_2_9_nxd_inference"
VLLM_VENV = "/opt/aws_neuronx_venv_pytorch_inference_vllm_0_16"
DEFAULT_ADAPTER = "$HOME/neuronx-distributed-inference/contrib/models/MiMo-V2-Flash/src"

RUN_SCRIPT = """#!/usr/bin/env bash
# Compile MiMo-V2-Flash with NxDI's MiMo adapter and run a smoke generation (written by neuron_export compile).
# Needs a trn2 host with the Neuron SDK venv and the MiMo-V2-Flash contrib adapter of NxDI (PR #137).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL_PATH="${MODEL_PATH:-@MODEL@}"
COMPILED_PATH="${COMPILED_PATH:-$HERE}"
ADAPTER_SRC="${@ADAPTER_ENV@:-@ADAPTER@}"
source "${NEURON_VENV:-@NXDI_VENV@}/bin/activate"
if [ ! -f "$ADAPTER_SRC/modeling_mimo_v2.py" ]; then
    echo "error: set @ADAPTER_ENV@ to NxDI's contrib/models/MiMo-V2-Flash/src" >&2
    exit 2
fi
if [ "${VERIFY_CHECKSUMS:-0}" = 1 ]; then (cd "$MODEL_PATH" && sha256sum --quiet -c SHA256SUMS); fi
python "$HERE/@BACKEND@" --model-path "$MODEL_PATH" --compiled-path "$COMPILED_PATH" \\
    --layout "$HERE/@LAYOUT@" --adapter-src "$ADAPTER_SRC" --prompt @PROMPT@ --max-new-tokens @TOKENS@
"""

SERVE_SCRIPT = """#!/usr/bin/env bash
# Serve the prepared checkpoint with vllm-neuron (written by neuron_export compile). Needs vllm-neuron with the
# MiMo-V2-Flash contrib registration patch (NxDI contrib perf_test/0_setup.sh). vllm-neuron compiles its own
# graphs (continuous batching, bucketing) into NEURON_COMPILED_ARTIFACTS; the first start takes 30-60 minutes.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL_PATH="${MODEL_PATH:-@MODEL@}"
source "${VLLM_VENV:-@VLLM_VENV@}/bin/activate"
# vllm-neuron imports modeling_mimo_v2 from $@ADAPTER_ENV@; point it at the shim, which
# loads the real adapter from MIMO_V2_FLASH_ADAPTER_SRC and installs its router-bias fix
# (the adapter's BF16 path would drop the bias).
export MIMO_V2_FLASH_ADAPTER_SRC="${@ADAPTER_ENV@:-@ADAPTER@}"
export @ADAPTER_ENV@="$HERE/vllm_adapter_shim"
export VLLM_ENGINE_READY_TIMEOUT_S="${VLLM_ENGINE_READY_TIMEOUT_S:-7200}"
export NEURON_COMPILED_ARTIFACTS="${NEURON_COMPILED_ARTIFACTS:-$HERE/vllm_compiled}"
python3 -m vllm.entrypoints.openai.api_server \\
    --model "$MODEL_PATH" \\
    --tensor-parallel-size @TP@ \\
    --max-model-len @SEQ@ \\
    --max-num-seqs @BATCH@ \\
    --no-enable-chunked-prefill \\
    --no-enable-prefix-caching \\
    --trust-remote-code \\
    --additional-config @CONFIG@
"""

SHIM = '''"""NxDI's MiMo-V2-Flash adapter plus its router-bias fix, for vllm-neuron (written by neuron_export compile).

The adapter registers RouterTopK.e_score_correction_bias only for FP8 (``quantized``) configs; this module runs
the real ``modeling_mimo_v2.py`` (from $MIMO_V2_FLASH_ADAPTER_SRC) in its own namespace, so every class keeps the
module name ``modeling_mimo_v2``, then installs the fix in each process that imports it.
"""

import os

_ADAPTER = os.path.join(os.environ["MIMO_V2_FLASH_ADAPTER_SRC"], "modeling_mimo_v2.py")
with open(_ADAPTER) as _handle:
    exec(compile(_handle.read(), _ADAPTER, "exec"))
NeuronMiMoV2ForCausalLM._apply_router_noaux_tc_fix()  # noqa: F821 (defined by the adapter)
'''


def vllm_override_config(layout: Layout) -> dict:
    """vllm-neuron ``override_neuron_config`` for the BF16 checkpoint (contrib README recipe without FP8 keys)."""
    context = layout.context_length
    return {
        "override_neuron_config": {
            "tp_degree": layout.tp,
            "logical_nc_config": layout.logical_nc_config,
            "fused_qkv": False,
            "sequence_parallel_enabled": False,
            "glu_mlp": True,
            "normalize_top_k_affinities": True,
            "save_sharded_checkpoint": True,
            "router_config": {"act_fn": "sigmoid", "dtype": "float32"},
            "blockwise_matmul_config": {
                "use_shard_on_block_dynamic_while": True,
                "block_sharding_strategy": "PING_PONG",
            },
            "moe_tp_degree": layout.moe_tp,
            "moe_ep_degree": layout.ep,
            "batch_size": layout.batch_size,
            "ctx_batch_size": 1,
            "tkg_batch_size": layout.batch_size,
            "max_context_length": context,
            "seq_len": layout.seq_len,
            "is_continuous_batching": True,
            "enable_bucketing": True,
            "context_encoding_buckets": [context],
            "token_generation_buckets": [layout.seq_len],
            "async_mode": True,
            "on_device_sampling_config": {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
        }
    }


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def write_bundle(
    target: Path, prepared: Path, layout: Layout, adapter_src: str | None, prompt: str, max_new_tokens: int
) -> list[str]:
    """Write the bundle into ``target`` (an existing directory); returns the file names."""
    (target / LAYOUT_NAME).write_text(json.dumps(layout.__dict__, indent=2) + "\n")
    shutil.copyfile(BACKEND_SCRIPT, target / BACKEND_NAME)
    values = {
        "MODEL": str(prepared.resolve()),
        "ADAPTER": str(adapter_src or DEFAULT_ADAPTER),
        "ADAPTER_ENV": ADAPTER_ENV,
        "NXDI_VENV": NXDI_VENV,
        "VLLM_VENV": VLLM_VENV,
        "BACKEND": BACKEND_NAME,
        "LAYOUT": LAYOUT_NAME,
        "PROMPT": shlex.quote(prompt),
        "TOKENS": str(max_new_tokens),
        "TP": str(layout.tp),
        "SEQ": str(layout.seq_len),
        "BATCH": str(layout.batch_size),
        "CONFIG": shlex.quote(json.dumps(vllm_override_config(layout))),
    }
    (target / "run_on_trn2.sh").write_text(_fill(RUN_SCRIPT, values))
    (target / "serve_vllm.sh").write_text(_fill(SERVE_SCRIPT, values))
    (target / "vllm_adapter_shim").mkdir()
    (target / "vllm_adapter_shim" / "modeling_mimo_v2.py").write_text(SHIM)
    for script in ("run_on_trn2.sh", "serve_vllm.sh", BACKEND_NAME):
        (target / script).chmod(0o755)
    (target / "README.txt").write_text(
        "MiMo-V2-Flash on Trainium (written by neuron_export compile)\n\n"
        f"layout: TP {layout.tp}, MoE EP {layout.ep} x MoE TP {layout.moe_tp}, LNC {layout.logical_nc_config}, "
        f"batch {layout.batch_size}, seq_len {layout.seq_len} on {layout.instance}\n"
        f"prepared checkpoint: {prepared.resolve()} (override with MODEL_PATH=...)\n\n"
        "1. bash run_on_trn2.sh   # NxDI compile into this directory + smoke generation (smoke_generation.json)\n"
        "2. bash serve_vllm.sh    # OpenAI-compatible server on :8000 via vllm-neuron\n\n"
        f"Both need {ADAPTER_ENV} (NxDI contrib/models/MiMo-V2-Flash/src, PR #137); VERIFY_CHECKSUMS=1 makes\n"
        "run_on_trn2.sh check the prepared checkpoint against its SHA256SUMS first.\n"
    )
    return sorted(p.name for p in target.iterdir())
