"""Evaluation: fidelity, diversity and utility figures of a synthetic set against real data."""
