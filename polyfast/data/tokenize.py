"""Tokenisation: records -> examples (token ids with the response marked).

Any Hugging Face tokenizer with a chat template works (loaded from a local directory, by
transformers from its JSON files, or sentencepiece's protobuf model, without remote code; the chat
template runs in transformers' sandboxed Jinja environment). The built-in
byte-level tokenizer is a real ``PreTrainedTokenizerFast`` (UTF-8 bytes 0..255 plus a few special
tokens, with its own chat template), so checkpoints trained with it load in transformers as they are.

An example's prompt is the chat template rendered up to the assistant turn (with the generation
prompt); its response is the rest of the fully rendered conversation (the response text and the
end-of-turn token). Labels mask everything but the response.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Sequence

from ..errors import DataError
from . import text as T
from .records import Record

BYTE_SPECIALS = ("<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _byte_alphabet() -> list[str]:
    """Byte b -> a printable unicode character, the usual reversible byte-level mapping."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer():
    """The built-in byte-level tokenizer: ids 0..255 are bytes, 256.. the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|end|>",
                                   additional_special_tokens=list(BYTE_SPECIALS[3:]))
    fast.chat_template = BYTE_CHAT_TEMPLATE
    assert len(fast) == 256 + len(BYTE_SPECIALS), len(fast)
    return fast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | None):
    """A local HF tokenizer directory, or None / "byte" for the built-in byte-level tokenizer."""
    if path in (None, "", "byte"):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError("tokenizer directory not found", path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise DataError("no tokenizer here (none of " + ", ".join(TOKENIZER_FILES) + ")", path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"transformers cannot load this tokenizer ({e})", path) from e
    if not tok.chat_template:
        raise DataError("tokenizer has no chat template", path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class Example:
    """One tokenised record: ``input_ids`` = prompt + response; the first ``n_prompt`` are prompt."""

    input_ids: tuple[int, ...]
    n_prompt: int
    bucket: str
    weight: float = 1.0       # the bucket weight w_b
    record_id: str = ""
    truncated: int = 0        # prompt tokens cut from the left

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def messages_for(record: Record, system: str = "profile") -> list[dict[str, str]]:
    """Chat messages of a record, ending on the human response.

    system: "profile" (the paper's profile prompt from the record's metadata), "record" (the
    record's own system prompt, if any) or "none".
    """
    if system == "profile":
        sys_text = T.profile_prompt(record.family, record.track, record.style, record.length_bin)
    elif system == "record":
        sys_text = record.system
    elif system == "none":
        sys_text = ""
    else:
        raise ValueError(f"system must be profile, record or none, got {system!r}")
    msgs = [{"role": "system", "content": sys_text}] if sys_text else []
    for user, assistant in record.history:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs += [{"role": "user", "content": record.prompt},
             {"role": "assistant", "content": record.response}]
    return msgs


def encode_record(tokenizer, record: Record, *, system: str = "profile", weight: float = 1.0) -> Example:
    msgs = messages_for(record, system)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"record {record.id}: the chat template does not render the prompt as a "
                        "prefix of the conversation; polyfast cannot locate the response")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return Example(tuple(p_ids + r_ids), len(p_ids), record.bucket_id, weight, record.id)


def encode_records(tokenizer, records: Sequence[Record], *, system: str = "profile",
                   weights: dict[str, float] | None = None) -> list[Example]:
    """Tokenise records; ``weights`` maps bucket -> w_b (missing buckets get 1.0)."""
    weights = weights or {}
    return [encode_record(tokenizer, r, system=system, weight=weights.get(r.bucket_id, 1.0))
            for r in records]


def fit_length(ex: Example, max_len: int, mode: str = "truncate_left") -> Example | None:
    """Fit an example into ``max_len`` tokens: cut prompt tokens from the left (keeping at least one
    prompt token, so no label sits at an example's first position), or return None to drop it."""
    if len(ex) <= max_len:
        return ex
    if mode == "drop" or ex.n_response + 1 > max_len:
        return None
    if mode != "truncate_left":
        raise ValueError(f"overlong must be truncate_left or drop, got {mode!r}")
    cut = len(ex) - max_len
    return dataclasses.replace(ex, input_ids=ex.input_ids[cut:], n_prompt=ex.n_prompt - cut,
                               truncated=cut)
