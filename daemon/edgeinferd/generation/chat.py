"""Chat messages -> prompt text, through the model's own chat template.

The template is the Jinja text the model ships (GGUF ``tokenizer.chat_template``
or ``tokenizer_config.json``'s ``chat_template``), rendered as transformers'
``apply_chat_template`` renders it: an immutable sandbox (a template cannot
reach Python objects or change state), ``trim_blocks`` and ``lstrip_blocks``,
``raise_exception`` for templates that refuse a conversation, and
``add_generation_prompt`` so the text ends where the assistant's answer begins.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgeinferd.errors import ConfigError, InvalidInput

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


class TemplateError(Exception):
    pass


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str, where: str) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateError as error:
            raise ConfigError(where, "", f"the chat template does not compile: {error}") from None
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt for ``messages``, ending with the assistant's turn opened."""
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateError as error:
            raise InvalidInput(f"the model's chat template refused the messages: {error}") from None
        except jinja2.TemplateError as error:
            raise InvalidInput(
                f"the model's chat template failed on the messages: {error}"
            ) from None
