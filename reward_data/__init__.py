"""Shipped demo task: data, its generator and the gold scorer."""
