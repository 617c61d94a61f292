"""Image references, normalised the way podman stores them, to tell what is present."""

from __future__ import annotations


def normalize(reference: str) -> str:
    """`busybox` -> `docker.io/library/busybox:latest`; `localhost/x` -> `localhost/x:latest`."""
    ref = reference.strip()
    if ref.startswith("sha256:") or _looks_like_id(ref):
        return ref
    name, digest = (ref.split("@", 1) + [""])[:2]
    first, _, rest = name.partition("/")
    has_registry = bool(rest) and ("." in first or ":" in first or first == "localhost")
    if not has_registry:
        name = f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"
    if digest:
        return f"{name}@{digest}"
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        name += ":latest"
    return name


def _looks_like_id(ref: str) -> bool:
    return len(ref) in (12, 64) and all(c in "0123456789abcdef" for c in ref)


def is_present(reference: str, present: frozenset[str]) -> bool:
    """Whether `reference` names one of the `present` images (normalised names and ids).

    A short name without a registry (`tiny:1`) also matches a local image of that
    path under any registry, as podman's own lookup of local images does.
    """
    ref = reference.strip()
    if ref in present or normalize(ref) in present:
        return True
    if ref.startswith("sha256:"):
        return ref[7:] in present
    if _looks_like_id(ref):
        return any(p.startswith(ref) for p in present)
    first = ref.split("/", 1)[0]
    if "/" in ref and ("." in first or ":" in first or first == "localhost"):
        return False
    tail = "/" + normalize(ref).removeprefix("docker.io/library/").removeprefix("docker.io/")
    return any(p.endswith(tail) for p in present)
