"""Training-time tools: the demo net, its surrogate task, snapshot callbacks (ZF Fig. 4)."""
