"""The model itself: loading it, and generating one token per row per step.

This is the only module that touches torch and transformers, and it imports
them inside functions, so importing the service (or the gateway, or the
tests' collection) does not pay for them. The scheduler (`batching`) decides
which requests share a batch and when each one ends; this module only turns a
batch of token rows into the next token of each row:

- `start` runs the prompts of new rows through the model together (left
  padded, so every row's last token is in the last column) and keeps their
  KV cache;
- `sample` draws each row's next token with its own temperature, top-p and
  random generator (seeded per request, so a seed reproduces a text);
- `advance` feeds those tokens back in, one column more of cache;
- `keep` drops rows that finished, so they cost nothing afterwards;
- `merge` joins a freshly started batch to a running one (continuous
  batching), when the model's cache is the plain kind whose tensors can be
  padded and concatenated.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aisemble.services.common.models import pick_device, prepare_transformers

if TYPE_CHECKING:
    import torch

log = logging.getLogger("aisemble.services.llm.engine")


class ModelLoadError(Exception):
    """The model directory cannot be loaded; the message says what a person must fix."""


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. temperature 0 is greedy (no randomness at all).

    top_k 0 (or below) keeps every token; the API has checked the ranges.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


@dataclass
class Batch:
    """Rows being generated together, and the tensors that carry them from step to step.

    `rows` are the scheduler's own objects, in the same order as the tensors'
    first dimension; the engine never looks inside them.
    """

    rows: list[Any]
    samplings: list[Sampling]
    generators: list[torch.Generator]
    cache: Any
    mask: torch.Tensor  # [rows, cache length]: 1 where a row has a real token
    positions: torch.Tensor  # [rows, 1]: the position of each row's next token
    logits: torch.Tensor  # [rows, vocab]: scores for each row's next token
    prompt_tokens: int = 0

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass
class Engine:
    model: Any
    tokenizer: Any
    device: str
    context_length: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    parameters: int = 0
    # Whether running batches can take in new rows: true when the model's
    # cache is plain [batch, heads, length, dim] tensors per layer.
    mergeable: bool = False
    # The fast tokenizer is shared by the event loop (encoding prompts) and the
    # generation thread (decoding tokens); Rust-backed tokenizers refuse
    # concurrent mutable borrows, so calls take turns.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    # -- text ------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        # A row needs at least one token to start from; an empty prompt starts
        # from the beginning-of-text token, as OpenAI's GPT models did.
        return list(ids) or [self._start_token()]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages as the model was trained to see them, ready for the assistant's turn."""
        with self._tokenizer_lock:
            if getattr(self.tokenizer, "chat_template", None):
                text = self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
                # The template writes any special tokens itself.
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                text = plain_transcript(messages)
                ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids) or [self._start_token()]

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _start_token(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else min(self.eos_token_ids)

    # -- generation -------------------------------------------------------

    def start(self, rows: list[Any], prompts: list[list[int]], samplings: list[Sampling]) -> Batch:
        """Run the prompts through the model together; the batch then holds each row's next-token scores."""
        import torch
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so padding does not shift a row's text.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        generators = []
        for sampling in samplings:
            generator = torch.Generator()
            if sampling.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sampling.seed)
            generators.append(generator)
        return Batch(
            rows=list(rows),
            samplings=list(samplings),
            generators=generators,
            cache=out.past_key_values,
            mask=mask,
            positions=positions[:, -1:] + 1,
            logits=out.logits[:, -1, :],
            prompt_tokens=sum(len(p) for p in prompts),
        )

    def sample(self, batch: Batch) -> list[int]:
        """Each row's next token, drawn by its own rules and generator."""
        import torch

        # Sampling happens on the CPU with CPU generators, so a seed gives the
        # same text whatever device the model runs on. In float64 and from the
        # best score down, so any temperature the API admits, however close to
        # 0, gives finite probabilities (float32 turned 1e-300 into 0, then NaN).
        logits = batch.logits.double().cpu()
        tokens = []
        for row, (sampling, generator) in enumerate(
            zip(batch.samplings, batch.generators, strict=True)
        ):
            scores = logits[row]
            if sampling.temperature <= 0:
                tokens.append(int(scores.argmax()))
                continue
            if 0 < sampling.top_k < scores.numel():
                kth = scores.topk(sampling.top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            probs = torch.softmax((scores - scores.max()) / sampling.temperature, dim=-1)
            if sampling.top_p < 1.0:
                # Nucleus: the smallest set of most likely tokens whose mass reaches top_p;
                # never empty, however small top_p is.
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
                outside[0] = False
                sorted_probs[outside] = 0.0
                pick = torch.multinomial(sorted_probs, 1, generator=generator)
                tokens.append(int(order[pick]))
            else:
                tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
        return tokens

    def advance(self, batch: Batch, tokens: list[int]) -> None:
        """Feed each row's new token through the model: one more column of cache, new scores."""
        import torch

        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(-1)
        batch.mask = torch.cat([batch.mask, torch.ones_like(ids)], dim=-1)
        with torch.inference_mode():
            out = self.model(
                input_ids=ids,
                attention_mask=batch.mask,
                position_ids=batch.positions,
                past_key_values=batch.cache,
                use_cache=True,
            )
        batch.cache = out.past_key_values
        batch.positions = batch.positions + 1
        batch.logits = out.logits[:, -1, :]

    def keep(self, batch: Batch, indices: list[int]) -> None:
        """Keep only these rows (in this order); the others are done."""
        import torch

        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        batch.cache.batch_select_indices(index)
        batch.mask = batch.mask[index]
        batch.positions = batch.positions[index]
        batch.logits = batch.logits[index]
        batch.rows = [batch.rows[i] for i in indices]
        batch.samplings = [batch.samplings[i] for i in indices]
        batch.generators = [batch.generators[i] for i in indices]
        if self.mergeable:
            # Columns no remaining row uses (the padding of rows that left)
            # would otherwise be attended over, masked, at every later step.
            used = batch.mask.any(dim=0).nonzero()
            first = int(used[0]) if len(used) else 0
            if first > 0:
                batch.mask = batch.mask[:, first:]
                for layer in batch.cache.layers:
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]

    def merge(self, running: Batch, joining: Batch) -> Batch:
        """One batch of both: the shorter cache is padded on the left (masked out), then rows are stacked."""
        import torch

        if not self.mergeable:
            raise RuntimeError("this model's cache cannot be merged; wait for the batch to finish")
        width = max(running.mask.shape[1], joining.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(running.cache.layers, joining.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)], dim=0)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)], dim=0)
        running.mask = torch.cat([pad(running.mask, 1), pad(joining.mask, 1)], dim=0)
        running.positions = torch.cat([running.positions, joining.positions], dim=0)
        running.logits = torch.cat([running.logits, joining.logits], dim=0)
        running.rows += joining.rows
        running.samplings += joining.samplings
        running.generators += joining.generators
        running.prompt_tokens += joining.prompt_tokens
        return running


def plain_transcript(messages: list[dict[str, str]]) -> str:
    """The chat prompt for tokenizers without a template: `role: content` lines, then `assistant:`."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def _plain_cache(model: Any) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    # Sliding-window, linear-attention and other special layers keep more than
    # [batch, heads, length, dim] tensors; merging those would corrupt them.
    return all(type(layer) is DynamicLayer for layer in cache.layers) and bool(cache.layers)


def load_engine(path: Path | str, device: str | None = None) -> Engine:
    """Load a transformers causal LM and its tokenizer from a local directory.

    Raises ModelLoadError with a message naming the problem (missing path, not
    a model directory, no tokenizer, not a causal LM).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (set LLM_MODEL_PATH)")
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory (set LLM_MODEL_PATH)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a model directory: it has no config.json "
            "(expected the output of save_pretrained)"
        )
    started = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prepare_transformers()
    device = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from exc
    try:
        # Half precision is slow or unsupported on CPUs; GPUs keep the saved dtype.
        dtype = "auto" if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as exc:
        raise ModelLoadError(f"cannot load a causal language model from {path}: {exc}") from exc
    model.to(device)
    model.eval()

    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    if not eos_ids:
        raise ModelLoadError(f"{path}: neither the model nor the tokenizer names an eos token")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos_ids)  # padding is masked out, any id will do
    config = model.config.get_text_config(decoder=True)
    context = (
        getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None)
        or tokenizer.model_max_length
    )
    engine = Engine(
        model=model,
        tokenizer=tokenizer,
        device=device,
        context_length=int(context),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        parameters=sum(p.numel() for p in model.parameters()),
        mergeable=_plain_cache(model),
    )
    log.info(
        "model loaded from %s on %s in %.1fs",
        path,
        device,
        time.monotonic() - started,
        extra={
            "fields": {
                "model_path": str(path),
                "device": device,
                "parameters": engine.parameters,
                "context_length": engine.context_length,
                "continuous_batching": engine.mergeable,
            }
        },
    )
    return engine
