"""Small shared helpers (devices, memory-sized batches)."""
