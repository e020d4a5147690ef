"""Low-bit weights: GGML block formats and packed low-bit linear layers."""
