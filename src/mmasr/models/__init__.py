"""Models by hub id or folder: loading, Whisper features and prompts, CLIP embeddings, encoder layers, the packaged Whisper."""
