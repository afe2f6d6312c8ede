#!/usr/bin/env python
"""Fine-tune MiMo-V2-Flash with Megatron-Bridge's training loop (full SFT or LoRA); launched by finetune.sh.

A thin command line over ``mimo_v2_flash.training.finetune``; with no arguments it trains the built-in tiny
model on ``data/tiny_sft.jsonl``. Run ``bash finetune.sh --help`` for the options.
"""

import sys
from pathlib import Path

from mimo_v2_flash.training.finetune import main

if __name__ == "__main__":
    sys.exit(main(default_data=Path(__file__).resolve().parent / "data" / "tiny_sft.jsonl"))
