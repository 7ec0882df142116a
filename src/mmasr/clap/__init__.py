"""CLAP-style contrastive audio-text model: embedding cache, heads and two-phase training, retrieval evaluation."""
