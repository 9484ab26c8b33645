"""invdiff-min: a minimal, from-scratch PyTorch implementation of InvDiff (arXiv 2412.08480)."""

from .version import __version__

__all__ = ["__version__"]
