"""Input and output: image sets, model loading, atomic file writes."""
