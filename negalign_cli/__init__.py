"""negalign: zero-shot OOD detection with CLIP and negative labels (MCM, NegLabel, NegRefine, NegAlign)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["CLIPNegAlign", "__version__"]

if TYPE_CHECKING:
    from negalign_cli.api import CLIPNegAlign


def __getattr__(name: str) -> Any:
    """``CLIPNegAlign`` is imported on first use, so that ``import negalign_cli`` (and the CLI's
    ``--help``) stays free of torch."""
    if name == "CLIPNegAlign":
        from negalign_cli.api import CLIPNegAlign

        return CLIPNegAlign
    raise AttributeError(f"module 'negalign_cli' has no attribute {name!r}")
