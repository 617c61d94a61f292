"""Podman's errors turned into what a person needs to act: which port, held by whom."""

from __future__ import annotations

import pytest

from aisemble.podman.errors import classify

# What podman answers when a pod's host port is taken, by podman version and network.
ROOTFUL_43 = (
    '{"Errs":["starting container e401c6350540dd8329b36eeb09dfb9c977f2a51a455a4e0dd8d737f887d8754b:'
    " cannot listen on the TCP port: listen tcp4 127.0.0.1:18431: bind: address already in use"
    '","starting container 82eeaafd608b80807fba0147fed9681ffbed4284063b5e13792b4e692c3abea9: a '
    "dependency of container 82eeaafd608b80807fba0147fed9681ffbed4284063b5e13792b4e692c3abea9 "
    'failed to start: container state improper"],'
    '"Id":"d4ad617d3b4bf5b1a1effaf9980935ffa257ddfca5f7d8f2074e8b831df7642b"}'
)
ROOTLESSPORT = (
    "starting container 5c1d0b8e9a7f: rootlessport listen udp 0.0.0.0:5353: bind: address "
    "already in use"
)
IPV6 = "cannot listen on the TCP port: listen tcp6 [::1]:8443: bind: address already in use"
PASTA = (
    "starting container 5c1d0b8e9a7f: setting up Pasta: pasta failed with exit code 1:\n"
    "Failed to bind port 18431 (Address already in use) for option '-t 127.0.0.1/18431-18431:"
    "8080-8080', exiting"
)


class ApiError(Exception):
    def __init__(self, explanation: str) -> None:
        super().__init__("500 Server Error")
        self.explanation = explanation


@pytest.mark.parametrize(
    ("text", "port", "command"),
    [
        (ROOTFUL_43, "127.0.0.1:18431/tcp", "ss -ltnp 'sport = :18431'"),
        (ROOTLESSPORT, "0.0.0.0:5353/udp", "ss -lunp 'sport = :5353'"),
        (IPV6, "[::1]:8443/tcp", "ss -ltnp 'sport = :8443'"),
        (PASTA, "127.0.0.1:18431/tcp", "ss -ltnp 'sport = :18431'"),
    ],
)
def test_a_port_held_outside_aisemble_is_named_with_how_to_find_the_holder(
    text: str, port: str, command: str
) -> None:
    failed = classify("create pod lab-web-0", "CreateFailed", ApiError(text))
    assert (failed.reason, failed.permanent) == ("PortInUse", True)
    assert failed.message.startswith(f"create pod lab-web-0: host port {port} is in use by ")
    assert "not AI-semble" in failed.message
    assert command in failed.message and "sudo" in failed.message
    assert "expose" in failed.message  # the other way out
    for raw in ("{", "Errs", "e401c635", "5c1d0b8e9a7f", "starting container"):
        assert raw not in failed.message


def test_a_port_podman_does_not_name_is_still_explained() -> None:
    failed = classify("create pod p", "CreateFailed", ApiError("bind: address already in use"))
    assert failed.reason == "PortInUse" and "ss -ltnup" in failed.message


def test_other_errors_keep_podmans_words() -> None:
    failed = classify("create pod p", "CreateFailed", ApiError("something odd"))
    assert (failed.reason, failed.message, failed.permanent) == (
        "CreateFailed",
        "create pod p: something odd",
        False,
    )
