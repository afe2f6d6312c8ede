#!/usr/bin/env python
"""Write the built-in tiny MiMo-V2-Flash as a Hugging Face checkpoint (random weights, every model feature).

A thin command line over ``mimo_v2_flash.make_tiny_checkpoint``; run with --help for the options.
"""

import sys

from mimo_v2_flash.make_tiny_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
