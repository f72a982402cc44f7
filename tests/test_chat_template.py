"""Chat templates (gptstack/template.py): the real models' own Jinja templates (SmolLM2's from its GGUF,
Gemma 3's from google/gemma-3's tokenizer_config.json) render character for character as transformers'
apply_chat_template renders them; templates that reach for Python internals (CVE-2024-34359) are refused
and provably never run; broken templates fail naming their source; the built-in template renders our
own format."""

from __future__ import annotations

import importlib.util
import os

import jinja2
import pytest
import tokenizers

from gptstack.template import BUILTIN_TEMPLATE, ChatTemplate, TemplateError, TemplateSecurityError
from gptstack.tokenizer import CHAT_TOKENS, byte_tokenizer

# google/gemma-3-270m's tokenizer_config.json "chat_template" (the 270M GGUF that installs offline ships none).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    '    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n    {%- endif -%}\n'
    "    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
TEXTS = ["Hi", "What is 2+2?", "  padded with spaces  ", "multi\nline\n\ntext", "emoji 🙂 and 你好",
         "It's 1,234.5 degrees", "tabs\tand \r\n", "a" * 40, "Answer: 4.", ""]  # fmt: skip


def conversations() -> list[list[dict]]:
    """40 conversations: 1-5 alternating turns, with and without a system message, fixed contents."""
    out = []
    for n in range(1, 6):
        for system in (False, True):
            for k in range(4):
                head = [{"role": "system", "content": TEXTS[(n + k) % len(TEXTS)]}] if system else []
                turns = [{"role": ("user", "assistant")[j % 2], "content": TEXTS[(3 * n + 2 * k + j) % len(TEXTS)]}
                         for j in range(n)]  # fmt: skip
                out.append(head + turns)
    return out


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def model_template(request):
    """(template source, its special tokens as transformers passes them)."""
    if request.param == "smollm2":
        template = request.getfixturevalue("smollm2_gguf")[0]["tokenizer.chat_template"]
        return template, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    return GEMMA3_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>"}


def hf_render(source: str, special: dict, messages: list[dict], add_generation_prompt: bool) -> str | None:
    """transformers' rendering (tokenize=False) of `messages`, None when the template refuses them."""
    transformers = (
        importlib.import_module("transformers") if os.environ.get("CI") else pytest.importorskip("transformers")
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.BPE()), **special
    )
    try:
        return tok.apply_chat_template(messages, chat_template=source, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)  # fmt: skip
    except Exception:  # jinja2's TemplateError from the template's raise_exception
        return None


def test_real_templates_render_exactly_as_transformers(model_template):
    source, special = model_template
    template = ChatTemplate(source, special["bos_token"], special["eos_token"])
    same = 0
    for messages in conversations():
        for add_generation_prompt in (False, True):
            want = hf_render(source, special, messages, add_generation_prompt)
            if want is None:  # Gemma refuses a system turn followed by an assistant turn: so must we
                with pytest.raises(TemplateError, match="roles must alternate"):
                    template.render(messages, add_generation_prompt)
                continue
            assert template.render(messages, add_generation_prompt) == want, messages
            same += 1
    assert same >= 60  # at least 30 conversations, each with and without the generation prompt


def test_the_builtin_template_is_our_own_format():
    template = ChatTemplate(BUILTIN_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]  # fmt: skip
    assert template.render(messages) == "<|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>"
    assert template.render(messages[:2], add_generation_prompt=True).endswith("<|end|><|assistant|>")
    with pytest.raises(TemplateError, match="need role system"):
        template.render([{"role": "wizard", "content": "x"}])


def test_our_tokenizers_encode_the_builtin_format_as_before():
    """Role token, the content's ordinary ids, <|end|>; the mask on the assistant's content and <|end|>."""
    tok = byte_tokenizer()
    sp = tok.special_tokens
    ids, mask = tok.encode_chat([{"role": "user", "content": "hi <|end|>"}, {"role": "assistant", "content": "ok"}])
    end = sp[CHAT_TOKENS["end"]]
    assert ids == [sp["<|user|>"], *b"hi <|end|>", end, sp["<|assistant|>"], *b"ok", end]
    assert mask == [False] * 12 + [False, True, True, True]
    assert tok.end_of_turn_id == end and tok.stop_ids == {end, tok.eot_id}


def test_what_hf_templates_use_is_there():
    t = ChatTemplate(
        "{{ strftime_now('%Y') | length }}|{{ '<a&b>' | tojson }}|{% if tools %}T{% endif %}"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "|{{ bos_token }}{{ eos_token }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    messages = [{"role": "user", "content": c} for c in "abc"]
    assert t.render(messages) == '4|"<a&b>"|ab|<s></s>'  # no HTML escaping in tojson, as transformers'
    assert ChatTemplate("{% if true %}\n  x{% endif %}").render([]) == "  x"  # trim_blocks; text keeps its spaces


PAYLOADS = [  # each would run `touch {file}` outside a sandbox
    # CVE-2024-34359, the llama-cpp-python GGUF template
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
    "{{ x()._module.__builtins__['__import__']('os').popen('touch {file}').read() }}{% endif %}{% endfor %}",
    "{{ lipsum.__globals__['os'].popen('touch {file}').read() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {file}').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch {file}') }}",
    "{{ namespace.__init__.__globals__['os'].system('touch {file}') }}",
    "{{ (messages|attr('__class__')).__mro__[1].__subclasses__() }}{{ 'touch {file}' }}",
    "{% set g = '__glo' ~ 'bals__' %}{{ (lipsum|attr(g))['os'].popen('touch {file}').read() }}",  # built at run time
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('touch {file}').read() }}",
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_templates_reaching_python_internals_are_refused_and_never_run(tmp_path, payload):
    file = tmp_path / "pwned"
    source = payload.replace("{file}", str(file))
    with pytest.raises(TemplateSecurityError, match="refused"):
        ChatTemplate(source, origin="tokenizer.chat_template of evil.gguf").render([{"role": "user", "content": "x"}])
    assert not file.exists()


def test_the_payloads_are_real_outside_the_sandbox(tmp_path):
    """The same templates in a plain (unsandboxed) Jinja environment do run the command: the refusal
    above is the sandbox's doing, not a broken payload."""
    for k in (1, 2):
        file = tmp_path / f"pwned{k}"
        jinja2.Environment().from_string(PAYLOADS[k].replace("{file}", str(file))).render()
        assert file.exists()


def test_broken_templates_fail_naming_their_source():
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError, match=r"^model\.gguf's template: line 1: .*"):
        ChatTemplate("{% for %}", origin="model.gguf's template")
    with pytest.raises(TemplateError, match=r"^chat_template\.jinja: rendering failed: TypeError"):
        ChatTemplate("{{ messages[0].content + 1 }}", origin="chat_template.jinja").render(messages)
    with pytest.raises(TemplateError, match=r"^t\.jinja: Conversation roles must alternate"):
        ChatTemplate(GEMMA3_TEMPLATE, origin="t.jinja").render(messages * 2)
    with pytest.raises(TemplateError, match="empty"):
        ChatTemplate("  ")
