"""The AI stack's services: gateway, llm, vision, nlp, data.

This package imports nothing of the operator. Each service is a FastAPI app
made by `common.create_app`; its `engine` module is the only place that
imports its heavy libraries (torch, transformers, pandas, pyspark), lazily.
"""
