#!/usr/bin/env python
"""Convert MiMo-V2-Flash checkpoints between Hugging Face and Megatron-Core (import, export, inspect-fp8).

A thin command line over ``mimo_v2_flash.conversion.cli``; run with --help for the options.
"""

import sys

from mimo_v2_flash.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
