"""Helpers the vision and NLP tests share: waiting for a model to settle, images in memory,
a tiny image classifier saved as a real model directory."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient


def wait_until_settled(client: TestClient, timeout: float = 60) -> dict[str, Any]:
    """Poll /ready until loading has ended, either way; the final body."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get("/ready").json()
        if body["status"] not in ("starting", "loading"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"still {body} after {timeout} s")
        time.sleep(0.01)


def encode(image: Any, format: str, **options: Any) -> bytes:
    """A Pillow image as the bytes of a file in `format`."""
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def save_tiny_vit(path: Path, labels: dict[int, str]) -> Path:
    """A ViT with random weights and these labels, saved where the service loads models from."""
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=labels,
        label2id={name: index for index, name in labels.items()},
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
