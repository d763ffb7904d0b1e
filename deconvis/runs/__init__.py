"""Runs of the top-k pipeline: config, phases, results, torch.distributed glue."""
