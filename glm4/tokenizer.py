"""tokenizer.json + the chat template -> token ids, and ids -> text, incrementally.

GLM adds no BOS of its own: `[gMASK]<sop>` comes from the chat template, exactly once, and the
rendered template is encoded without the tokenizer's special-token post-processing (as transformers'
apply_chat_template does), so nothing is lost or doubled.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from glm4.checkpoint import resolve_checkpoint

TEMPLATES_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = ("glm4", "glm-z1")
# Generation stops on any of these (reference §3): <|user|> ends a chat turn, <|observation|> a tool call.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def builtin_template(name: str) -> str:
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(
            f"unknown built-in chat template {name!r} (and no such file); choose one of "
            f"{', '.join(BUILTIN_TEMPLATES)}, a .jinja file, or the template text"
        )
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def _compile_template(source: str) -> jinja2.Template:
    """A jinja environment like transformers': sandboxed, trim/lstrip blocks, loop controls."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
    ):
        # Not jinja's own tojson, which escapes HTML characters.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Glm4Tokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # eos_token, pad_token, ... as in tokenizer_config
        self._compiled: jinja2.Template | None = None

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, chat_template: str | None = None
    ) -> Glm4Tokenizer:
        """Read tokenizer.json, tokenizer_config.json and chat_template.jinja from a folder or hub id.

        `chat_template` overrides the checkpoint's: a built-in name ("glm4", "glm-z1"), a .jinja
        file, or the template text itself.
        """
        folder = resolve_checkpoint(path_or_repo_id, revision=revision)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if chat_template is not None:
            template = _template_source(chat_template)
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                special[key] = value
        return cls(tokenizer, template, special)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "padding_side": "left",
            **self.special_tokens,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    # -- ids ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token", "<|endoftext|>"))

    @property
    def stop_token_ids(self) -> list[int]:
        """The GLM stop tokens this vocabulary has."""
        ids = [self.token_to_id(t) for t in STOP_TOKENS]
        return [i for i in ids if i is not None]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, batch: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(
        self, texts: str | list[str], add_special_tokens: bool = True, padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """Encode a batch into `input_ids` and `attention_mask` tensors, padded on the left for generation."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.pad([self.encode(t, add_special_tokens) for t in texts], padding_side)

    def pad(self, batch: list[list[int]], padding_side: str = "left") -> dict[str, torch.Tensor]:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        width = max((len(ids) for ids in batch), default=0)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # -- chat --------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Render messages with the chat template (as transformers renders it) and tokenize it."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (base models such as GLM-4-32B-Base-0414 ship none); "
                "pass chat_template='glm4' or 'glm-z1' to use a built-in one, or prompt it with plain text"
            )
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"each message must be a dict with a 'role', got {message!r}")
        text = self._compiled.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


def _template_source(chat_template: str) -> str:
    """A built-in name, a template file, or the template text itself (anything with a jinja tag)."""
    if "{" in chat_template:
        return chat_template
    if Path(chat_template).is_file():
        return Path(chat_template).read_text(encoding="utf-8")
    return builtin_template(chat_template)


class IncrementalDecoder:
    """Turn a stream of token ids into text deltas, never emitting half a UTF-8 character.

    Byte-level BPE splits multi-byte characters across tokens; decoding a window of recent tokens
    and holding back text that ends in U+FFFD (an incomplete character) keeps every delta whole.
    """

    def __init__(self, tokenizer: Glm4Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: tokens before it are fully emitted
        self.read = 0  # tokens up to here have been emitted as text

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        now = decode(self.ids[self.prefix :], self.skip_special_tokens)
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (an incomplete character stays U+FFFD)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], self.skip_special_tokens)
        now = decode(self.ids[self.prefix :], self.skip_special_tokens)
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]
