"""negalign: zero-shot OOD detection with CLIP and negative labels (MCM, NegLabel, NegRefine, NegAlign)."""

__version__ = "0.1.0"
