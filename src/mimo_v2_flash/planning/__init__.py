"""Parallel layouts: which TP / PP / EP / ETP sizes a model admits and what each costs per GPU."""
