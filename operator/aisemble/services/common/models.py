"""What every model service does before loading with transformers.

Imports torch and transformers only when called, so importing this module
costs nothing in the gateway's image, which has neither.
"""

from __future__ import annotations

import os


def prepare_transformers() -> None:
    """Local files only (the services have no route to a hub, and must not try), and
    no progress bars (they would break the JSON log lines)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def pick_device(requested: str | None) -> str:
    """The device asked for, else CUDA when a GPU is visible (one was assigned), else CPU."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
