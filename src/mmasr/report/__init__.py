"""The one self-contained HTML report."""
