"""sgdlab: the stochastic side of training deep networks.

How mini-batches are drawn (:mod:`sgdlab.sampling`), where noise is injected
(:mod:`sgdlab.regularize`), and diagnostics of the solutions SGD finds
(:mod:`sgdlab.analysis`), tied together by a config-driven engine (:mod:`sgdlab.train`).
"""

__version__ = "0.1.0"
