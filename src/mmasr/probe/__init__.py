"""A calibrated classifier probing multi-layer audio embeddings for a manifest label."""
