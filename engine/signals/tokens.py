"""Token counts with a real tokenizer: per role, and of the whole chat as the model would see it.

A pure per-batch computation: the Ray stage holds one `TokenCounter` per actor and feeds it
batches; tests call it directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

TOKEN_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("tokens_user", pa.int64()),
        ("tokens_assistant", pa.int64()),
        ("tokens_chat", pa.int64()),
    ]
)


class TokenCounter:
    """Counts tokens of conversations with one tokenizer (loaded once, reused for every batch)."""

    def __init__(self, tokenizer_path: str, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=trust_remote_code
        )
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def _render(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        """Chat-template text per conversation; None where the template refuses one
        (templates that demand strict user/assistant alternation raise on some rows)."""
        try:
            return list(self.tokenizer.apply_chat_template(list(conversations), tokenize=False))
        except Exception:
            rendered: list[str | None] = []
            for conversation in conversations:
                try:
                    rendered.append(
                        self.tokenizer.apply_chat_template(conversation, tokenize=False)
                    )
                except Exception:
                    rendered.append(None)
            return rendered

    def count(self, ids: Sequence[str], conversations: Sequence[list[dict]]) -> pa.RecordBatch:
        """`tokens_chat` is null when the tokenizer has no chat template or it refuses the row."""
        texts, owners, roles = [], [], []
        for i, conversation in enumerate(conversations):
            for message in conversation:
                texts.append(message["content"])
                owners.append(i)
                roles.append(message["role"])
        lengths = (
            [len(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            if texts
            else []
        )
        user = [0] * len(conversations)
        assistant = [0] * len(conversations)
        for owner, role, length in zip(owners, roles, lengths, strict=True):
            if role == "user":
                user[owner] += length
            elif role == "assistant":
                assistant[owner] += length
        chat: list[int | None] = [None] * len(conversations)
        if self.has_chat_template and conversations:
            rendered = self._render(conversations)
            present = [i for i, text in enumerate(rendered) if text is not None]
            encoded = self.tokenizer([rendered[i] for i in present], add_special_tokens=False)[
                "input_ids"
            ]
            for i, ids_ in zip(present, encoded, strict=True):
                chat[i] = len(ids_)
        return pa.RecordBatch.from_pydict(
            {
                "id": list(ids),
                "tokens_user": user,
                "tokens_assistant": assistant,
                "tokens_chat": chat,
            },
            schema=TOKEN_SCHEMA,
        )
