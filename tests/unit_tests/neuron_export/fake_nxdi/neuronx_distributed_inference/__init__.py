"""Test fake of ``neuronx_distributed_inference`` (the parts NxDI's MiMo adapter and neuron_export use).

Only importable when tests put ``tests/unit_tests/neuron_export/fake_nxdi`` on ``PYTHONPATH``; never installed.
"""
