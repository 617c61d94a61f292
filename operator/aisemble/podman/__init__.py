"""Everything that talks to podman, and nothing else does."""
