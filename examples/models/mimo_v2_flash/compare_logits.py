#!/usr/bin/env python
"""Check an exported HF checkpoint against the Megatron checkpoint it came from (transformers vs Megatron logits).

A thin command line over ``mimo_v2_flash.runtime.compare_logits``; run with --help for the options.
"""

import sys

from mimo_v2_flash.runtime.compare_logits import main

if __name__ == "__main__":
    sys.exit(main())
