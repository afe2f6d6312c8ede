"""Find the real Neuron SDK (in a subprocess) and run the NxDI backend script with it.

PyPI only has placeholder packages for the Neuron SDK: ``torch-neuronx`` raises ``ImportError("WRONG PACKAGE")``
on import and ``neuronx-distributed-inference`` is not importable, the real ones come from the AWS Neuron index.
Importing them is therefore only attempted in a child process of the chosen interpreter (by default this one;
on a trn2 host usually ``/opt/aws_neuronx_venv_pytorch_2_9_nxd_inference/bin/python``): a placeholder, a crash or
a missing interpreter cannot take this process down, and the SDK never has to live in this project's venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BACKEND_SCRIPT = Path(__file__).with_name("nxdi_backend.py")
PROBE = "import neuronx_distributed_inference, torch_neuronx"
ADAPTER_MODULE = "modeling_mimo_v2.py"
ADAPTER_ENV = "NXDI_CONTRIB_MIMO_V2_FLASH_SRC"
PROBE_TIMEOUT_S = 600


@dataclass(frozen=True)
class SdkStatus:
    """Whether ``python`` can import the Neuron SDK, and why not."""

    python: str
    available: bool
    detail: str


def child_env(adapter_src: str | None) -> dict[str, str]:
    """This environment, with the adapter directory first on ``PYTHONPATH``."""
    env = dict(os.environ)
    if adapter_src:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(adapter_src), env.get("PYTHONPATH")) if p)
    return env


def detect_sdk(python: str | None = None, adapter_src: str | None = None) -> SdkStatus:
    """Try ``import neuronx_distributed_inference, torch_neuronx`` with ``python`` in a subprocess."""
    python = python or sys.executable
    try:
        result = subprocess.run(
            [python, "-c", PROBE],
            env=child_env(adapter_src),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError:
        return SdkStatus(python, False, f"interpreter {python} not found")
    except subprocess.TimeoutExpired:
        return SdkStatus(python, False, f"importing the SDK with {python} took over {PROBE_TIMEOUT_S} s")
    if result.returncode == 0:
        return SdkStatus(python, True, "neuronx_distributed_inference and torch_neuronx import")
    lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    return SdkStatus(python, False, lines[-1] if lines else f"exit code {result.returncode}")


def adapter_dir(adapter_src: str | None) -> str | None:
    """The adapter source directory from the flag or ``$NXDI_CONTRIB_MIMO_V2_FLASH_SRC``."""
    return adapter_src or os.environ.get(ADAPTER_ENV) or None


def run_backend(python: str, arguments: list[str], adapter_src: str | None) -> int:
    """Run the backend script; its output goes straight to this process's stdout/stderr (compile logs)."""
    return subprocess.run(
        [python, str(BACKEND_SCRIPT), *arguments], env=child_env(adapter_src), check=False
    ).returncode
