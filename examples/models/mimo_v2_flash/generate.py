#!/usr/bin/env python
"""Greedy generation with MiMo-V2-Flash on Megatron-Core (CPU or GPU), from an HF or a Megatron checkpoint.

A thin command line over ``mimo_v2_flash.runtime.generate``; run with --help for the options.
"""

import sys

from mimo_v2_flash.runtime.generate import main

if __name__ == "__main__":
    sys.exit(main())
