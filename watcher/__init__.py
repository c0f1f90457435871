"""ckpt-watch: evaluate every training checkpoint as soon as it is completely written."""

__version__ = "0.1.0"
