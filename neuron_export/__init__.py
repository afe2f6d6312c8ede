"""Deploy MiMo-V2-Flash to AWS Trainium with NxDI's MiMo adapter: inspect, prepare, plan, compile.

``python -m neuron_export --help`` (or the ``neuron-export`` console script, ``neuron_export.cli:main``).
"""

from neuron_export.cli import main

__all__ = ["main"]
