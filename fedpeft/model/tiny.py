"""The tiny model (--model tiny): built in code with a fixed seed, no downloads, and saved once into the
cache so it reloads by path like any other base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from fedpeft.atomic import atomic_dir
from fedpeft.model.cache import cache_root

# A small Llama with a byte-level tokenizer: fast enough for unit tests and smoke runs, real enough
# that every code path (attention, MLP, tied embeddings, bitsandbytes layers) is exercised.
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
TINY_NAME = "tiny-llama-v1"


# ChatML, as the default base's template writes turns, so tests exercise task data end to end
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokenizer() -> Any:
    """A byte-level tokenizer built in code: 256 byte tokens + end-of-text, no downloads."""
    from transformers import PreTrainedTokenizerFast  # transformers: only building the tiny model needs it

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tok.add_special_tokens([eos])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    out.chat_template = TINY_CHAT_TEMPLATE
    return out


def build_tiny(cache_dir: str | None = None, seed: int = 0) -> Path:
    """A small random Llama, built from TINY_CONFIG with a fixed seed and saved so it reloads by path."""
    dest = cache_root(cache_dir) / TINY_NAME
    if (dest / "config.json").is_file():
        return dest
    from transformers import LlamaConfig, LlamaForCausalLM  # transformers: only building it needs it

    tokenizer = _byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest
