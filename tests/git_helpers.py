"""A real git repository for tests: write files, commit, and sign webhook requests."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

IDENTITY = ["-c", "user.name=aisemble-test", "-c", "user.email=test@aisemble.invalid"]


class GitRepo:
    """A repository with a working tree at `path`, on branch `main`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "--quiet", "--initial-branch=main")

    def git(self, *args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(self.path), *IDENTITY, *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()

    def write(self, name: str, *documents: dict[str, Any]) -> Path:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def remove(self, name: str) -> None:
        self.git("rm", "--quiet", name)

    def commit(self, message: str = "change") -> str:
        """Commit everything in the working tree; returns the commit id."""
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.git("rev-parse", "HEAD")


def post(url: str, body: bytes = b"{}", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST to the webhook; (status, decoded JSON body)."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def github_headers(secret: bytes, body: bytes, event: str = "push") -> dict[str, str]:
    signature = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": event,
        "X-Hub-Signature-256": f"sha256={signature}",
        "Content-Type": "application/json",
    }
