"""The data processor's settings, from DATA_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from aisemble.services.common import env_settings

EngineChoice = Literal["pandas", "spark", "auto"]


class DataSettings(BaseModel):
    root: Path = Field(
        Path("/data"),
        description="The data root: every path in an operation list is relative to it, "
        "and nothing outside it is read or written.",
    )
    default_engine: EngineChoice = Field(
        "pandas", description="The engine used when a request names none."
    )
    auto_spark_bytes: int = Field(
        2 * 2**30,
        ge=0,
        description="With engine `auto`, inputs larger than this (in bytes, all reads "
        "together) run on Spark; smaller ones on pandas.",
    )
    spark_master: str = Field(
        "local[*]",
        description="Any Spark master URL: local[N], spark://host:7077, yarn, k8s://... "
        "Beyond local, the data root must be mounted at the same path on every executor.",
    )
    spark_shuffle_partitions: int = Field(
        16,
        ge=1,
        description="spark.sql.shuffle.partitions. Spark's 200 suits clusters; one host "
        "wants a few per core.",
    )
    spark_conf: str = Field(
        "",
        description="More Spark settings, `key=value` pairs separated by commas "
        "(e.g. `spark.driver.memory=8g`); they win over the service's own.",
    )
    preview_rows: int = Field(20, ge=0, description="Rows returned when a request names none.")
    max_preview_rows: int = Field(
        1000, ge=0, description="The most rows a request may ask to see; more gets 422."
    )

    @field_validator("spark_conf")
    @classmethod
    def _pairs(cls, value: str) -> str:
        _parse_pairs(value)  # fails at start-up, not at the first Spark run
        return value

    @model_validator(mode="after")
    def _preview_within_limit(self) -> DataSettings:
        if self.preview_rows > self.max_preview_rows:
            raise ValueError(
                f"preview_rows ({self.preview_rows}) is above max_preview_rows "
                f"({self.max_preview_rows})"
            )
        return self

    def spark_options(self) -> dict[str, str]:
        return _parse_pairs(self.spark_conf)


def _parse_pairs(text: str) -> dict[str, str]:
    options = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{pair.strip()!r} is not key=value")
        options[key.strip()] = value.strip()
    return options


def load_settings() -> DataSettings:
    return env_settings(DataSettings, "DATA")
