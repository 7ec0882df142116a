"""Parameter-efficient adaptation of Whisper (LoRA adapters, the peft library)."""
