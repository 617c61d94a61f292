"""How a container gets the values of its `secretKeyRef` variables, and nothing else does.

Each variable's value is a podman secret of its own (see podman.secrets). Where
podman hides secret variables from `podman inspect` (5.3 and later), they are
libpod's `secret_env`: podman sets them when it starts the process.

Older podman shows every variable the process started with in `podman inspect`,
`secret_env` ones included. There the secrets are mounted read-only under
/run/secrets instead, and a small `sh` launcher reads them into the environment
and `exec`s the service's own command, so only the service's process (and what
it starts) has them. That needs `/bin/sh` and `cat` in the image; commands run
with `podman exec` (health checks too) do not see those variables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aisemble.planning.desired import PodTemplate
from aisemble.podman.errors import ActionFailed

MASKED_SINCE = (5, 3)  # podman hides secret_env values in `podman inspect` from this release
MOUNT_PREFIX = "aisemble-env-"  # /run/secrets/aisemble-env-<n>
READABLE = 0o444  # the service may run as any user; the mount is the container's own
LAUNCHER = "aisemble-env"  # the launcher's $0, as `ps` shows it until it execs
SECRETS_DIR = "/run/secrets"  # where podman mounts secrets with a relative target
SECRETS_TMPFS = {
    "Destination": SECRETS_DIR,
    "Type": "tmpfs",
    "Source": "tmpfs",
    "Options": ["rw", "nosuid", "nodev", "noexec", "size=64k", "mode=755"],
}


def deliver(
    payload: dict[str, Any],
    t: PodTemplate,
    podman_version: tuple[int, int],
    image_config: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """`payload` (libpod's SpecGenerator for `t`) with `t.secret_env` wired in.

    `image_config()` gives the image's Config (Entrypoint, Cmd); asked only when the
    launcher needs the command the image would run.
    """
    if not t.secret_env:
        return payload
    if podman_version >= MASKED_SINCE:
        return {**payload, "secret_env": dict(t.secret_env)}
    argv = _command(payload, image_config)
    if not argv:
        raise ActionFailed(
            "StartFailed",
            f"{t.container_name}: neither the service nor image {t.image} gives a command",
            permanent=True,
        )
    files = [
        {"Source": secret, "Target": f"{MOUNT_PREFIX}{i}", "Mode": READABLE}
        for i, (_, secret) in enumerate(t.secret_env)
    ]
    mounts = list(payload.get("mounts") or [])
    if not any(m.get("Destination") in ("/run", SECRETS_DIR) for m in mounts):
        # A read-only root filesystem has no room for the files' mount points: a small
        # tmpfs of its own does (the files are bind mounts over it, not in it).
        mounts.append(SECRETS_TMPFS)
    return {
        **payload,
        "secrets": list(payload.get("secrets") or []) + files,
        "mounts": mounts,
        "entrypoint": ["/bin/sh", "-c", launcher(t.secret_env), LAUNCHER],
        "command": argv,
    }


def launcher(secret_env: tuple[tuple[str, str], ...]) -> str:
    """The shell script that sets each variable from its mounted file and execs "$@".

    `$(...)` drops trailing newlines: a `.` after the value keeps them, then goes. The
    `v<n>` shell variables are not exported: the service does not inherit them.
    Variable names are `[A-Za-z_][A-Za-z0-9_.-]*` (the spec's rule): safe inside
    double quotes; those `export` cannot take (with `.` or `-`) go through `env`.
    """
    lines = ["set -e"]
    through_env = []
    for i, (name, _) in enumerate(secret_env):
        lines.append(f"v{i}=$(cat {SECRETS_DIR}/{MOUNT_PREFIX}{i} && echo .)")
        if name.replace("_", "a").isalnum() and not name[0].isdigit():
            lines.append(f'export {name}="${{v{i}%.}}"')
        else:
            through_env.append(f'"{name}=${{v{i}%.}}"')
    lines.append(f'exec env {" ".join(through_env)} "$@"' if through_env else 'exec "$@"')
    return "\n".join(lines)


def _command(payload: dict[str, Any], image_config: Callable[[], dict[str, Any]]) -> list[str]:
    """The command podman would run for `payload` (libpod's makeCommand)."""
    config: dict[str, Any] | None = None

    def image() -> dict[str, Any]:
        nonlocal config
        if config is None:
            config = image_config() or {}
        return config

    entrypoint = payload.get("entrypoint")
    if entrypoint is None:
        entrypoint = image().get("Entrypoint") or []
    if entrypoint == [""]:
        entrypoint = []
    command = payload.get("command") or []
    if not command and not payload.get("entrypoint"):
        command = image().get("Cmd") or []
    return [*entrypoint, *command]
