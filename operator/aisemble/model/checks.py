"""Checks across the fields of one stack: names unique, references resolve, no cycles.

They read a spec as plain data (parsed YAML, or a validated spec dumped to it) and
return every problem they find, each a SpecError naming its field. The spec's model
validator raises the first; the loader runs them on a document whose schema failed too,
so one run reports everything wrong with it. What is malformed (the schema's errors say
so) is passed over, and a reference is called unknown only when every name it could
name is known.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic

from aisemble.model.security import PROFILES, SecurityContext, profile_refusal

HostPort = tuple[str, int, str]  # (hostIP, hostPort, protocol)


class SpecError(ValueError):
    """A validation error that knows which field is wrong, relative to the model raising it
    (for the spec's checks, relative to spec)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def spec_problems(spec: Mapping[str, Any]) -> list[SpecError]:
    """Every problem across the fields of `spec`, in the order of its fields."""
    services = mappings(spec.get("services"))
    problems = duplicates(services, "service name", "services")
    problems += duplicates(mappings(spec.get("volumes")), "volume name", "volumes")
    # Each service's first entry (a duplicate's second is reported above).
    by_name: dict[str, Mapping[str, Any]] = {}
    for _, svc in services:
        if isinstance(svc.get("name"), str):
            by_name.setdefault(svc["name"], svc)
    known = _names(spec.get("services"), required=True)
    volumes = _names(spec.get("volumes"), required=False)
    security = spec.get("security", {})  # the default profile is restricted
    profile = security.get("profile", "restricted") if isinstance(security, Mapping) else None
    for i, svc in services:
        problems += _service_problems(i, svc, profile, known, volumes)
    if spec.get("nodeName") is not None and spec.get("nodeSelector"):
        problems.append(SpecError("nodeSelector", "give either nodeName or nodeSelector, not both"))
    graph = {
        name: [d for d in svc.get("dependsOn") or [] if isinstance(d, str) and d != name]
        for name, svc in by_name.items()
        if isinstance(svc.get("dependsOn") or [], list)
    }
    cycle = find_cycle(graph)
    if cycle:
        i = next(i for i, svc in services if svc.get("name") == cycle[0])
        problems.append(
            SpecError(f"services[{i}].dependsOn", "dependency cycle: " + " -> ".join(cycle))
        )
    problems += _expose_problems(spec, by_name, known)
    return problems


def _service_problems(
    i: int,
    svc: Mapping[str, Any],
    profile: object,
    known: list[str] | None,
    volumes: list[str] | None,
) -> list[SpecError]:
    problems = []
    name = svc.get("name")
    context = svc.get("securityContext")
    if profile in PROFILES and isinstance(context, Mapping):
        try:
            refused = profile_refusal(profile, SecurityContext.model_validate(context))  # type: ignore[arg-type]
        except pydantic.ValidationError:
            refused = None  # the schema's errors say what is wrong with it
        if refused:
            problems.append(SpecError(f"services[{i}].{refused[0]}", refused[1]))
    check = svc.get("healthcheck")
    http = check.get("http") if isinstance(check, Mapping) else None
    if isinstance(http, Mapping) and http.get("port") is None and svc.get("port") is None:
        problems.append(
            SpecError(
                f"services[{i}].healthcheck.http.port",
                f"service {name!r} has no port; set healthcheck.http.port",
            )
        )
    deps = svc.get("dependsOn")
    for j, dep in enumerate(deps if isinstance(deps, list) else []):
        if not isinstance(dep, str):
            continue
        if known is not None and dep not in known:
            problems.append(
                SpecError(
                    f"services[{i}].dependsOn[{j}]",
                    f"unknown service {dep!r}; the stack has: {', '.join(known)}",
                )
            )
        elif dep == name:
            problems.append(
                SpecError(f"services[{i}].dependsOn[{j}]", "a service cannot depend on itself")
            )
    for j, mount in mappings(svc.get("volumeMounts")):
        volume = mount.get("volume")
        if isinstance(volume, str) and volumes is not None and volume not in volumes:
            have = ", ".join(sorted(set(volumes))) or "none declared"
            problems.append(
                SpecError(
                    f"services[{i}].volumeMounts[{j}].volume",
                    f"unknown volume {volume!r}; spec.volumes has: {have}",
                )
            )
    return problems


def _expose_problems(
    spec: Mapping[str, Any], by_name: Mapping[str, Mapping[str, Any]], known: list[str] | None
) -> list[SpecError]:
    problems = []
    for i, exp in mappings(spec.get("expose")):
        name = exp.get("service")
        svc = by_name.get(name) if isinstance(name, str) else None
        if svc is None:
            if isinstance(name, str) and known is not None:
                problems.append(SpecError(f"expose[{i}].service", f"unknown service {name!r}"))
            continue
        if exp.get("port") is None and svc.get("port") is None:
            problems.append(
                SpecError(f"expose[{i}].port", f"service {name!r} has no port; set expose.port")
            )
    seen: list[tuple[HostPort, int]] = []
    for i, binding in host_bindings(spec):
        for other, k in seen:
            if host_ports_clash(other, binding):
                problems.append(
                    SpecError(
                        f"expose[{i}].hostPort",
                        f"host port {binding[1]}/{binding[2]} is already used by expose[{k}]",
                    )
                )
                break
        seen.append((binding, i))
    return problems


def host_bindings(spec: Mapping[str, Any]) -> list[tuple[int, HostPort]]:
    """(index in expose, binding) of each entry of `spec.expose` whose binding reads."""
    found = []
    for i, exp in mappings(spec.get("expose")):
        port, ip = exp.get("hostPort"), exp.get("hostIP", "127.0.0.1")
        protocol = exp.get("protocol", "tcp")
        if (
            isinstance(port, int)
            and not isinstance(port, bool)
            and isinstance(ip, str)
            and isinstance(protocol, str)
        ):
            found.append((i, (ip, port, protocol)))
    return found


def host_ports_clash(a: HostPort, b: HostPort) -> bool:
    """Two host bindings clash when port and protocol match and either binds every address."""
    wildcard = {"0.0.0.0", "::"}
    return a[1:] == b[1:] and (a[0] == b[0] or a[0] in wildcard or b[0] in wildcard)


_DONE: Any = object()


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """Return one dependency cycle as a path that ends where it starts, or None.

    Depth first, without recursion: a chain of dependencies may be longer than Python's
    recursion limit."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        state[start] = 1
        path, pending = [start], [iter(graph.get(start, []))]
        while pending:
            nxt = next(pending[-1], _DONE)
            if nxt is _DONE:
                state[path.pop()] = 2
                pending.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                pending.append(iter(graph.get(nxt, [])))
    return None


def duplicates(items: list[tuple[int, Mapping[str, Any]]], what: str, path: str) -> list[SpecError]:
    """A SpecError at each item whose `name` an earlier item has already."""
    seen: dict[str, int] = {}
    problems = []
    for i, item in items:
        name = item.get("name")
        if not isinstance(name, str):
            continue
        if name in seen:
            problems.append(
                SpecError(f"{path}[{i}]", f"duplicate {what} {name!r} (also at index {seen[name]})")
            )
        seen.setdefault(name, i)
    return problems


def mappings(value: object) -> list[tuple[int, Mapping[str, Any]]]:
    """(index, item) of the items of a list that are mappings; none if it is no list."""
    if not isinstance(value, list):
        return []
    return [(i, item) for i, item in enumerate(value) if isinstance(item, Mapping)]


def _names(value: object, required: bool) -> list[str] | None:
    """The names of a list of named items, or None if some cannot be known (a malformed
    item; the list missing, where it is `required`)."""
    if value is None and not required:
        return []
    if not isinstance(value, list):
        return None
    names = [item.get("name") if isinstance(item, Mapping) else None for item in value]
    return names if all(isinstance(n, str) for n in names) else None  # type: ignore[return-value]


__all__ = [
    "HostPort",
    "SpecError",
    "find_cycle",
    "host_bindings",
    "host_ports_clash",
    "spec_problems",
]
