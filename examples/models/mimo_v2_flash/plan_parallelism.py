#!/usr/bin/env python
"""Per-rank memory of MiMo-V2-Flash for a parallel layout, and the best layouts for given GPU counts.

A thin command line over ``mimo_v2_flash.planning.cli``; run with --help for the options.
"""

import sys

from mimo_v2_flash.planning.cli import main

if __name__ == "__main__":
    sys.exit(main())
