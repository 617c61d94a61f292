"""The orchestrator: one API in front of the AI services, with jobs, workflows and OpenAI routes."""
