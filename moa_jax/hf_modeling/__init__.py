"""Hugging Face custom code that `moa_jax.export_hf` copies into exported model directories (needs torch)."""
