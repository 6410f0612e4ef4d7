"""Fault injection: real processes signalled, poisoned and resumed, and
damaged checkpoints."""
