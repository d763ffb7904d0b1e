"""The backward rule of the ReLU family: the one thing that tells the three projections apart.

``Rule.DECONVNET`` is Zeiler & Fergus's mirror (the ReLU rectifies the reconstruction),
``Rule.GUIDED`` is guided backpropagation (Springenberg et al. 2014) and ``Rule.GRADIENT`` the
plain input gradient (saliency, Simonyan et al. 2013). Every other op takes its exact derivative
in all three, so a rule is a value passed around, never a string compared in several places.

For a ReLU-family unit with forward input ``x``, forward slope ``s(x)`` and incoming signal ``g``:

==========================  ===============  =====================  ==================
unit                        gradient         deconvnet              guided
==========================  ===============  =====================  ==================
ReLU                        ``g*[x>0]``      ``max(g, 0)``          ``max(g,0)*[x>0]``
ReLU6 (clamp to [0, 6])     ``g*[0<x<6]``    ``max(g, 0)``          ``max(g,0)*[0<x<6]``
LeakyReLU/PReLU (slope a)   ``g*s(x)``       ``g`` if g>0 else a*g  ``max(g,0)*s(x)``
==========================  ===============  =====================  ==================
"""
from __future__ import annotations

import enum
from typing import Union

from deconvis.errors import DeconvisError, close_matches


class Rule(str, enum.Enum):
    """Backward rule of a projection; compares equal to its name (``Rule.GUIDED == "guided"``)."""

    DECONVNET = "deconvnet"
    GUIDED = "guided"
    GRADIENT = "gradient"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union[str, "Rule"]) -> "Rule":
        """``Rule`` from a name (case-insensitive); DeconvisError naming the choices otherwise."""
        if isinstance(value, Rule):
            return value
        key = str(value).strip().lower()
        for rule in cls:
            if rule.value == key:
                return rule
        names = [r.value for r in cls]
        raise DeconvisError(f"unknown rule {value!r}; choose one of {', '.join(names)}"
                            + close_matches(str(value), names))


#: The rule names, in the order the CLI lists them.
RULES = tuple(r.value for r in Rule)
