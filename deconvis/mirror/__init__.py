"""The mirror: ZF's deconvnet (and guided/gradient rules) over a traced graph."""
