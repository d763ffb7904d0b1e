"""The traced graph and its geometry: one tracer, receptive fields, effective receptive fields."""
