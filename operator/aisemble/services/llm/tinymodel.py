"""A tiny GPT-2-style model with random weights, made on the spot.

No model can be downloaded where the tests, the demo and the benchmark run,
yet all of them should load through the same `from_pretrained` path a real
model takes. This writes such a directory in well under a second: a byte-level
BPE tokenizer trained on a few sentences (so any text encodes), eos/pad tokens,
a simple chat template, and a GPT-2 config with seeded random weights. The
text it generates is gibberish; the shapes, the cache and the tokenizer are real.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"

# Renders `role: content` lines and leaves the prompt open for the assistant,
# the same transcript the service falls back to for models without a template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model answers questions about containers, pods and services.",
    "Podman runs containers without a daemon; Kubernetes schedules pods.",
    "user: hello there\nassistant: hello, how can I help you today?",
    "The operator reconciles the desired state with the observed state.",
    "Tokens are generated one at a time, in batches, with a key-value cache.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like ! ? , . : ; - appear too.",
]


def make_tiny_model(
    path: Path,
    vocab_sentences: list[str] | None = None,
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    heads: int | None = None,
    vocab_size: int = 384,
    context: int = 512,
) -> Path:
    """Write a loadable causal LM with random weights to `path` and return `path`.

    The same arguments always give the same files: BPE training is
    deterministic and the weights come from a generator seeded with `seed`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a tiny save needs no progress bar in the logs

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    raw = Tokenizer(models.BPE())
    # Byte-level pieces: every string encodes, and decoding gives it back.
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(vocab_sentences or SENTENCES, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS,
        pad_token=PAD,
        bos_token=EOS,
        unk_token=EOS,
        model_max_length=context,
        # Generation pads on the left so every row's last token is at the end.
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=context,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads or max(1, hidden // 32),
        bos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        # Untied, so the output layer can be shaped without touching the input.
        tie_word_embeddings=False,
    )
    # A private RNG state: callers' own torch random streams stay untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    _readable_output(model, tokenizer)
    model.eval()
    model.save_pretrained(path)
    # safetensors writes its file 0600; a model in a shared volume is read by the
    # services' own user, whoever wrote it.
    for written in path.iterdir():
        if written.is_file():
            written.chmod(0o644)
    return path


def _readable_output(model, tokenizer) -> None:
    """Make tokens that are not printable text (stray UTF-8 bytes, control bytes, padding) all but impossible.

    Random weights pick every token about equally often, and byte-level
    vocabularies are full of lone bytes, so the demo would print mojibake.
    Hidden unit 0 becomes a constant (its final layer norm scale 0, bias 10)
    and each unreadable token's output weight on it -3: a logit of -30.
    """
    import torch

    unreadable = [
        i
        for i in range(len(tokenizer))
        if i != tokenizer.eos_token_id and not _printable(tokenizer.decode([i]))
    ]
    with torch.no_grad():
        model.transformer.ln_f.weight[0] = 0.0
        model.transformer.ln_f.bias[0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[unreadable, 0] = -3.0


def _printable(text: str) -> bool:
    return bool(text) and "\ufffd" not in text and all(c.isprintable() or c in " \n" for c in text)


def main(argv: list[str] | None = None) -> None:
    """`python -m aisemble.services.llm.tinymodel DIR`: write the demo model where the service will look."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Write a tiny random-weight causal LM (demo model)."
    )
    parser.add_argument("path", type=Path, help="directory to write, e.g. /models/llm")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_model(args.path, layers=args.layers, hidden=args.hidden, seed=args.seed)
    print(f"demo model (random weights) written to {path}")


if __name__ == "__main__":
    main()
