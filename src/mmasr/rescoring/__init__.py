"""Rescoring Whisper n-best lists with the picture: n-best decoding, CLIP scores, fusion and the alpha search, transcription."""
