#!/usr/bin/env bash
# Fine-tune MiMo-V2-Flash with Megatron-Bridge (full SFT or LoRA); see `bash finetune.sh --help`.
#
#   bash finetune.sh [flags] [section.key=value ...]      starts torchrun itself (--nproc-per-node N, default 1)
#   torchrun --no-python --nproc-per-node 2 finetune.sh ... already under torchrun: trains directly
#
# With no flags: the built-in tiny model on data/tiny_sft.jsonl, on this machine's CPUs or GPUs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi

# Under torchrun (it sets TORCHELASTIC_RUN_ID and the rank variables): this process is one rank.
if [ -n "${TORCHELASTIC_RUN_ID:-}" ] && [ -n "${LOCAL_RANK:-}" ]; then
  exec "$python" "$here/finetune.py" "$@"
fi

nproc=1
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) exec "$python" "$here/finetune.py" --help ;;
    --print-config) args+=("$1"); shift; print_config=1 ;;
    --nproc-per-node) nproc="$2"; shift 2 ;;
    --nproc-per-node=*) nproc="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
# --print-config reads configs only: one process, no torchrun, nothing imported.
if [ -n "${print_config:-}" ]; then exec "$python" "$here/finetune.py" "${args[@]}"; fi
# Bad paths or data get their one-line error here, before torchrun starts any process.
"$python" "$here/finetune.py" --preflight "${args[@]}" || exit $?
exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$here/finetune.py" "${args[@]}"
