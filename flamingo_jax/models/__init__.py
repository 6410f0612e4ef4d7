"""Haiku modules: vision encoders, Perceiver Resampler, LM, GATED XATTN-DENSE."""
