"""The embedded demo only: corpus synthesis, demo tokenizers and small models, their pre-training. Research code never imports it."""
