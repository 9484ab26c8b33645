"""invdiff-min: a minimal, from-scratch PyTorch implementation of InvDiff (arXiv 2412.08480)."""

__version__ = "0.1.0"
