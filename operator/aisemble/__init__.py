"""AI-semble: run stacks of AI services on Podman hosts, declaratively."""

__version__ = "0.1.0"
