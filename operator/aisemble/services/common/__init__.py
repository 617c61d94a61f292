"""What every service shares: the app factory, probes, metrics, request ids, JSON logs."""

from aisemble.services.common.app import Readiness, create_app
from aisemble.services.common.errors import ServiceUnavailable
from aisemble.services.common.settings import env_settings

__all__ = ["Readiness", "ServiceUnavailable", "create_app", "env_settings"]
