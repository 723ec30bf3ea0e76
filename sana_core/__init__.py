"""Sana-style model core: Linear DiT, rectified flow, samplers, text encoder, DC-AE wrapper, tiny model zoo."""
