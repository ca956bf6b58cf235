"""Tools around the tracer: ``memory_model`` predicts the memory of attribution per layer from a
UNet config; ``measure`` runs one guided step three ways and measures it (also as
``python -m i2am_fast.tools.measure``); ``machine`` describes the machine for result tables."""
