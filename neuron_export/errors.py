"""The one exception type ``neuron_export`` raises for expected, user-facing problems."""

from __future__ import annotations


class ExportError(ValueError):
    """A problem the user can fix (bad input, infeasible layout, missing SDK); reported as one line, exit 2."""
