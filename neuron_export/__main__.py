"""``python -m neuron_export``."""

import sys

from neuron_export.cli import main

sys.exit(main())
