"""Test fake of ``torch_neuronx``: importable, nothing else (neuron_export only probes the import)."""
