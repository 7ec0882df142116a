"""mmasr: a reproducible pipeline for multimodal (speech + picture) speech recognition research."""

__version__ = "0.1.0"
