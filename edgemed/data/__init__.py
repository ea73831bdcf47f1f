"""Data edgemed generates itself: the `synthetic-cxr` radiograph task (no download, no patients)."""
