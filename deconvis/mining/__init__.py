"""Mining the strongest activations per channel over an image set."""
from deconvis.mining.mine import (EMPTY, MiningTimes, TopK, channel_maxima, hooked_activations,  # noqa: F401
                                  mine)
