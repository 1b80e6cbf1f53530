"""Chat templates a recipe may name: mergekit's built-in names (written as each model family's own
format), ``auto``, or Jinja text; and the check of a recipe's ``chat_template`` value."""

from __future__ import annotations

from typing import Any

from .methods.base import suggest
from .text import one_line, safe_repr

# -- chat templates -----------------------------------------------------------------------------
# mergekit 0.1.5's built-in names, each written here as the prompt format of the model family it is
# named after (ChatML; Meta's Llama 3; Stanford Alpaca; Mistral-Instruct v0.2; LG's EXAONE 3.0).
# Where mergekit's files render stray whitespace (llama3: a newline after each turn; alpaca: no
# blank line before a generation prompt, two leading newlines without a system message; exaone:
# indentation in the output), these follow the model families' own format instead. Jinja runs with
# transformers' settings (trim_blocks, lstrip_blocks).
BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        r"{%- for m in messages -%}"
        r"{{- '<|im_start|>' ~ m['role'] ~ '\n' ~ m['content'] ~ '<|im_end|>\n' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
    ),
    "llama3": (
        r"{%- for m in messages -%}"
        r"{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
        r"{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\n\n' ~ m['content'] | trim ~ '<|eot_id|>' -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
    ),
    "alpaca": (
        r"{%- set heads = {'user': '### Instruction:\n', 'user_context': '### Input:\n', 'assistant': '### Response:\n', 'system': ''} -%}"
        r"{%- set turns = messages | selectattr('role', 'in', heads) | list -%}"
        r"{%- for m in turns -%}"
        r"{{- ('' if loop.first else '\n\n') ~ heads[m['role']] ~ m['content'] | trim -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt and (not turns or turns[-1]['role'] != 'assistant') -%}"
        r"{{- ('\n\n' if turns else '') ~ '### Response:\n' -}}"
        r"{%- endif -%}"
    ),
    "mistral": (
        r"{%- if messages and messages[0]['role'] == 'system' -%}"
        r"{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        r"{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        r"{{- bos_token -}}"
        r"{%- for m in turns -%}"
        r"{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) or m['role'] not in ('user', 'assistant') -%}"
        r"{{- raise_exception('mistral template: after an optional system message, the roles must alternate user, assistant, user, ...') -}}"
        r"{%- elif m['role'] == 'user' -%}"
        r"{{- ' [INST] ' ~ (system ~ '\n\n' if loop.first and system is defined else '') ~ m['content'] ~ ' [/INST]' -}}"
        r"{%- else -%}"
        r"{{- ' ' ~ m['content'] ~ eos_token -}}"
        r"{%- endif -%}"
        r"{%- endfor -%}"
    ),
    "exaone": (
        r"{%- for m in messages -%}"
        r"{%- if loop.first and m['role'] != 'system' -%}{{- '[|system|][|endofturn|]\n' -}}{%- endif -%}"
        r"{{- '[|' ~ m['role'] ~ '|]' ~ m['content'] ~ ('\n' if m['role'] == 'user' else '[|endofturn|]\n') -}}"
        r"{%- endfor -%}"
        r"{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"
    ),
}


def chat_template_problem(value: str) -> str | None:
    """What is wrong with a recipe's ``chat_template`` (None when it is usable): ``auto``, a built-in
    name, or Jinja text (anything with a ``{``, as mergekit tells them apart) that parses."""
    if value == "auto" or value in BUILTIN_CHAT_TEMPLATES:
        return None
    if "{" not in value:
        names = ["auto", *BUILTIN_CHAT_TEMPLATES]
        return (f"chat_template: {safe_repr(value, 80)} is not auto, a built-in template ({', '.join(BUILTIN_CHAT_TEMPLATES)}) "
                f"or Jinja text{suggest(value, names)}")
    problem = jinja_syntax_problem(value)
    return f"chat_template: not a valid Jinja template: {problem}" if problem else None


def jinja_syntax_problem(text: str) -> str | None:
    """A syntax error of a chat template, parsed as transformers will (None when it parses, or when jinja2 is absent)."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 comes with transformers' chat templates
        return None

    class _Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` block (marks assistant tokens)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return one_line(f"line {exc.lineno}: {exc.message}")
    return None
