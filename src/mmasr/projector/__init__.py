"""SLAM-ASR style projector between a frozen speech encoder and a frozen decoder-only LM: encoder cache, training, decoding."""
