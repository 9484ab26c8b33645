"""invdiff-min: a minimal, from-scratch PyTorch implementation of InvDiff (arXiv 2412.08480).

    from invdiff_min import InvDiffPipeline             # a trained run as one object: sample, judge
    from invdiff_min import pipeline                    # the stages A-D as functions (what train.py runs)
"""
from .inference import InvDiffOutput, InvDiffPipeline
from .version import __version__

__all__ = ["InvDiffOutput", "InvDiffPipeline", "__version__"]
