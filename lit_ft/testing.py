"""Hub-free tiny assets for tests, examples and config smoke runs.

Everything here is built in-process from a few lines of text: a byte-level BPE tokenizer with a chat template,
a tiny Llama config and small prompt/completion JSONL files. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is was for on with as by at from apples oranges books pens cars birds "
    "how many much more less total left each has have had bought sold gave found there are were "
    "Tom Ann Sam Lucy Mia Ben one two three four five six seven eight nine ten answer question "
    "plus minus times divided equals number numbers sum difference product what who when"
).split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences with digits, for training the tiny tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words.insert(rng.randint(0, len(words)), str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!"]))
    return lines


def make_tiny_tokenizer(path: str | Path, vocab_size: int = 384) -> str:
    """Train a byte-level BPE tokenizer on :func:`tiny_corpus`, save it as an HF folder, return the path.

    Special tokens mirror SmolLM2 (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``); pad = eos, and a chat
    template is set, so chat and prompt/completion code paths can both be exercised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if (path / "tokenizer.json").exists():
        return str(path)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return str(path)


def tiny_llama_config(vocab_size: int = 384, **overrides: Any) -> dict[str, Any]:
    """A 2-layer Llama config dict (a few hundred k parameters) accepted by ``CausalLMModule(model_config=...)``."""
    cfg: dict[str, Any] = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


def write_tiny_sft_jsonl(path: str | Path, n: int = 32, seed: int = 0, chat: bool = False) -> str:
    """Write ``n`` arithmetic prompt/completion rows (or chat ``messages`` rows) and return the path."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            who = rng.choice(["Tom", "Ann", "Sam", "Lucy"])
            prompt = f"{who} has {a} apples and buys {b} more. How many apples are there?"
            completion = f"{a} plus {b} equals {a + b}. The answer is {a + b}."
            if chat:
                row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
            else:
                row = {"prompt": prompt, "completion": completion, "answer": str(a + b)}
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_tiny_classification_jsonl(path: str | Path, n: int = 32, seed: int = 0) -> str:
    """Write ``n`` rows ``{"text", "label"}`` with a learnable rule (label 1 iff the text mentions apples)."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            label = i % 2
            noun = "apples" if label else rng.choice(["books", "pens", "cars"])
            f.write(json.dumps({"text": f"{rng.choice(_WORDS)} {noun} {rng.choice(_WORDS)}", "label": label}) + "\n")
    return str(path)


def write_tiny_preference_jsonl(path: str | Path, n: int = 32, seed: int = 0) -> str:
    """Write ``n`` arithmetic preference rows ``{"prompt", "chosen", "rejected"}`` (the chosen answer is right, the
    rejected one off by one) and return the path."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            row = {"prompt": f"Tom has {a} apples and buys {b} more. How many apples are there?",
                   "chosen": f"{a} plus {b} equals {a + b}. The answer is {a + b}.",
                   "rejected": f"{a} plus {b} equals {a + b + 1}. The answer is {a + b + 1}."}
            f.write(json.dumps(row) + "\n")
    return str(path)
