"""Data: tokenizer, text formatting and input pipelines."""
