"""Fixtures for tests against real podman."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import podman
import pytest
from podman_helpers import Env


@pytest.fixture
def env(podman_env: Path, tmp_path: Path) -> Iterator[Env]:
    client = podman.PodmanClient(base_url=os.environ["CONTAINER_HOST"])
    environment = Env(podman_env, tmp_path, client)
    try:
        yield environment
    finally:
        environment.cleanup()
        client.close()
