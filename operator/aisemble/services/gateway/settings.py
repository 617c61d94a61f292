"""Gateway settings, from GATEWAY_* environment variables."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GatewaySettings(BaseModel):
    llm_url: str = Field("http://llm:8000", description="Base URL of the LLM service.")
    vision_url: str = Field("http://vision:8000", description="Base URL of the vision service.")
    nlp_url: str = Field("http://nlp:8000", description="Base URL of the NLP service.")
    data_url: str = Field(
        "http://data-processor:8000", description="Base URL of the data processor."
    )
    jobs_db: str = Field(
        "/var/lib/aisemble-gateway/jobs.db",
        description="SQLite file holding jobs; put it on a volume so jobs survive restarts.",
    )
    backend_timeout_s: float = Field(120.0, gt=0, description="Longest wait for a backend answer.")
    connect_timeout_s: float = Field(3.0, gt=0, description="Longest wait to connect to a backend.")
    ready_timeout_s: float = Field(
        2.0, gt=0, description="Timeout of each backend readiness probe."
    )
    job_workers: int = Field(4, ge=1, le=64, description="Jobs that run at the same time.")
    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="Largest request body accepted.")
    rerun_interrupted: bool = Field(
        False,
        description="Run again, at start-up, the jobs that were running when the gateway stopped "
        "(instead of reporting them failed).",
    )
    required_backends: str = Field(
        "llm,vision,nlp,data",
        description="Backends /ready waits for, comma separated (empty: none).",
    )

    def backend_urls(self) -> dict[str, str]:
        return {
            "llm": self.llm_url,
            "vision": self.vision_url,
            "nlp": self.nlp_url,
            "data": self.data_url,
        }
