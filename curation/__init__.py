"""Curation: Ray Data pipeline from raw images to captioned, scored, DC-AE-encoded WebDataset shards."""
