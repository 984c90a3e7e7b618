"""poststate: post-training is about states, not tokens (arXiv 2605.22731), as a DVC pipeline."""

__version__ = "0.1.0"
