"""What the Section 4 analysis subcommands (invariance, correspondence, diagnose) share in their
``run_config``: the torch thread count and the network of the config."""
from __future__ import annotations

from typing import Any


def configured_network(cfg: Any) -> Any:
    """Set ``cfg.threads`` torch CPU threads (0: torch's default) and load ``cfg.model`` with
    ``cfg.weights`` on ``cfg.device``: a :class:`deconvis.analysis.common.LoadedModel`."""
    import torch

    from deconvis.analysis.common import load_network

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return load_network(cfg.model, cfg.weights, cfg.device)
