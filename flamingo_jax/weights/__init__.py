"""Importers of published checkpoints into flamingo_jax parameter trees.

One module per source, each a pure mapping (DESIGN.md): `read(path)` -> a
lazy `{name: array}` (`tensors.TensorStore`; no code from pickles is run),
`config_from(path, tensors)` -> the model config the checkpoint fits, and
`to_params(tensors, config)` -> hk.Params through a table of name rules
(`mapping`: every tensor used once, every parameter filled once).

  readers   tensors.py (store, open_path), safetensors_file.py,
            torch_file.py, haiku_pickle.py, safe_pickle.py
  sources   hf_clip.py, open_clip.py (ViT towers), nfnet_npz.py (DeepMind),
            timm_nfnet.py; vision.py holds what they share;
            hf_llama.py, hf_gpt_neox.py, hf_mpt.py, hf_mosaic_gpt.py (MPT-1B),
            hf_gpt2.py (Hugging Face causal LMs -> `lm/...`); hf_lm.py
            holds what they share
  CLI       convert.py: `python -m flamingo_jax.weights.convert --help`
"""
