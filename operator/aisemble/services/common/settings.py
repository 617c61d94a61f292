"""Settings from environment variables, typed and validated by pydantic.

`env_settings(Model, prefix)` fills a model from `PREFIX_FIELD` variables
(field names upper-cased), so `LLM_MAX_BATCH_SIZE=8` sets `max_batch_size`.
An empty variable counts as unset (`VISION_MODEL_PATH=` keeps the default), as
manifests often carry a variable empty for people to fill in. A bad value
fails at start-up with the variable's name in the message.
"""

from __future__ import annotations

import os
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class SettingsError(Exception):
    pass


def env_settings(model: type[M], prefix: str, environ: dict[str, str] | None = None) -> M:
    env = os.environ if environ is None else environ
    values = {}
    for name in model.model_fields:
        variable = f"{prefix}_{name}".upper()
        if env.get(variable, "") != "":
            values[name] = env[variable]
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{prefix}_{'_'.join(str(p) for p in e['loc'])}".upper() + f": {e['msg']}"
            for e in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None
