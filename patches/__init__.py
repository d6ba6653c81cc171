"""Megatron-core integration of gmm-plugin (filled in by the experts patch)."""
