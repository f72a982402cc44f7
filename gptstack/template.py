"""Chat templates: a model's own Jinja template, rendered the way transformers renders it, in a sandbox.

A chat template is Jinja source that turns `messages` ([{"role", "content"}, ...]) into the one string a
chat model was trained on. Real models ship theirs (`chat_template` in tokenizer_config.json,
chat_template.jinja, `tokenizer.chat_template` in a GGUF); our own models use BUILTIN_TEMPLATE, the
`<|user|>…<|end|>` format, expressed as a template too so that every model goes through one code path.

A template is untrusted code from a model file (CVE-2024-34359: a GGUF whose template reached
`lipsum.__globals__` ran shell commands in llama-cpp-python). Two layers keep it inert:
- before anything renders, the parsed template is searched for dunder attribute or item names
  (`__globals__`, `__class__`, `|attr("__init__")` …): such a template raises TemplateSecurityError
  when it is built, so no part of it ever executes;
- rendering runs in Jinja's ImmutableSandboxedEnvironment, which refuses every underscore attribute and
  every mutating method at run time (a name assembled at run time is caught here; its SecurityError
  becomes TemplateSecurityError as well).

The environment matches transformers' (utils/chat_template_utils.py): trim_blocks and lstrip_blocks, the
loopcontrols extension, `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, and
the variables `messages`, `add_generation_prompt`, `tools` (None), `documents` (None), `bos_token`,
`eos_token` (and `pad_token`, `unk_token` when the tokenizer has them), so a rendering is character for
character what `tokenizer.apply_chat_template(messages, tokenize=False)` returns.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Our own models' format: a role token, the content, <|end|> closing every turn (tokenizer.CHAT_TOKENS).
BUILTIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role not in ('system', 'user', 'assistant') or message.content is not string %}"
    "{{ raise_exception('message ' ~ loop.index0 ~ ': need role system|user|assistant and a string content') }}"
    "{% endif %}"
    "<|{{ message.role }}|>{{ message.content }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class TemplateError(ValueError):
    """A chat template that does not compile or render; the message names the template's source."""


class TemplateSecurityError(TemplateError):
    """A chat template that reaches for Python internals; it is refused and never executed."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers' override: Jinja's own tojson escapes <, >, & and ' for HTML, which templates do not want
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


_ENV = _environment()


def _unsafe_names(tree: jinja2.nodes.Node) -> list[str]:
    """Dunder names the template reads: `x.__y`, `x["__y"]`, `x|attr("__y")`."""
    found = [n.attr for n in tree.find_all(jinja2.nodes.Getattr) if n.attr.startswith("__")]
    for n in tree.find_all(jinja2.nodes.Getitem):
        if isinstance(n.arg, jinja2.nodes.Const) and isinstance(n.arg.value, str) and n.arg.value.startswith("__"):
            found.append(n.arg.value)
    for n in tree.find_all(jinja2.nodes.Filter):
        args = [a.value for a in n.args if isinstance(a, jinja2.nodes.Const) and isinstance(a.value, str)]
        found += [a for a in args if n.name == "attr" and a.startswith("_")]
    return found


class ChatTemplate:
    """A compiled chat template. `origin` names where the source came from, for error messages."""

    def __init__(
        self,
        source: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        *,
        pad_token: str | None = None,
        unk_token: str | None = None,
        origin: str = "chat template",
    ):
        if not isinstance(source, str) or not source.strip():
            raise TemplateError(f"{origin}: the chat template is empty")
        self.source, self.origin = source, origin
        self.special = {k: v for k, v in dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                                               unk_token=unk_token).items() if v is not None}  # fmt: skip
        try:
            tree = _ENV.parse(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{origin}: line {e.lineno}: {e.message}") from None
        if unsafe := _unsafe_names(tree):
            raise TemplateSecurityError(
                f"{origin}: refused: the template reaches for Python internals ({', '.join(sorted(set(unsafe)))}); "
                "it was not run"
            )
        self.template = _ENV.from_string(tree)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **variables: Any) -> str:
        """The conversation as the model's text (transformers' apply_chat_template(tokenize=False))."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TemplateError(f"{self.origin}: messages must be a list of {{'role', 'content'}} objects")
        context = {"tools": None, "documents": None, **self.special, **variables}
        try:
            return self.template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.exceptions.SecurityError as e:
            raise TemplateSecurityError(f"{self.origin}: refused while rendering: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.origin}: {e.message or type(e).__name__}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            raise TemplateError(f"{self.origin}: rendering failed: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate({self.origin!r}, {len(self.source)} characters)"
