"""Feature visualisation by optimisation (Olah et al. 2017): the image that maximises a channel
or a unit, on a decorrelated Fourier parametrisation with transformation robustness.

:func:`visualize_channels` is the Python entry point; :mod:`deconvis.featvis.run` writes the PNGs
and JSON of ``deconvis featvis``.
"""
from deconvis.featvis.optimize import FeatVis, LayerObjective, visualize_channels
from deconvis.featvis.param import FourierParam

__all__ = ["FeatVis", "FourierParam", "LayerObjective", "visualize_channels"]
