"""Data in: ingestion (demo folder, manifest, TORGO), preprocessing, speaker-disjoint splits, text normalisation, audio reading."""
