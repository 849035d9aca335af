"""Models, samplers and checkpoint loading, one module per system."""
