"""Training of the Linear DiT on curated WebDataset shards: data, caption sampling, step, distributed, checkpoints."""
