"""Evaluation: metrics of the few-shot benchmarks and their runners."""
