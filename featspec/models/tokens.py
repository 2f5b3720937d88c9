"""The token ids a generation starts and stops on: chat prompts (the tokenizer's own template) and EOS ids.

Base models without a template (Gemma-3-270M) get plain text: the turns joined by blank lines. The
caller is told which path was taken so the CLI can say so.
"""

from __future__ import annotations


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids for a conversation ending with a user turn, ready for the assistant's reply."""
    if has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n\n".join(m["content"] for m in messages)
    return [int(i) for i in tokenizer(text)["input_ids"]]


def encode_text(tokenizer, text: str) -> list[int]:
    """Raw text completion prompt (no template)."""
    return [int(i) for i in tokenizer(text)["input_ids"]]


def eos_token_ids(model, tokenizer) -> list[int]:
    """The ids generation stops on: the generation config's EOS (as HF generate uses), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
