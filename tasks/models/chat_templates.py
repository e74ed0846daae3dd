"""Chat templates: render a conversation with the base model's own template or a named built-in one
(the recipe's `model.chat_template`; tasks/train/worker.py gives it to the training tokenizer).
`python -m tasks.train.mask_view` shows which tokens of a training row the loss sees.

The built-in templates are the plain-text chat part (system, user and assistant turns; no tools) of each
family's official template, written out here so no hub download is needed:

| name       | models                                  | source of the reference rendering                     |
|------------|-----------------------------------------|-------------------------------------------------------|
| chatml     | generic ChatML                          | ChatML (OpenHermes/llama.cpp reference)               |
| smollm2    | HuggingFaceTB/SmolLM2-*-Instruct        | the tokenizer of the embedded base model              |
| qwen2.5    | Qwen/Qwen2.5-*-Instruct                 | trl/chat_templates/qwen2_5.jinja (original template)  |
| llama-3.1  | meta-llama/Llama-3.1-*-Instruct         | trl/chat_templates/llama3_1.jinja (original template) |
| gemma-3    | google/gemma-3-*-it                     | trl/chat_templates/gemma3.jinja (original template)   |
| phi-4      | microsoft/phi-4                         | tokenizer_config.json, as quoted by llama.cpp's tests |
| phi-4-mini | microsoft/Phi-4-mini-instruct           | tokenizer_config.json (the whole template)            |
| glm-4      | THUDM/GLM-4-9B-0414, GLM-4-32B-0414     | GLM-4-0414 template (llama.cpp's ChatGLM4 rendering)  |

tests/models/test_chat_templates.py renders the first five against those references. GLM-4 has no end-of-turn
token: an assistant turn ends where the next role tag (<|user|>) or <|endoftext|> begins, which its
generation config lists as stop tokens. Phi-4's official template opens the assistant turn after every
user turn, with or without add_generation_prompt; it is reproduced as is. Llama-3.1's "Today Date" is fixed
to the reference rendering's date: llama.cpp passes the serving day as `date_string`, so the official
template would prompt a deployed model differently from training every day.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

QWEN2_5 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

LLAMA3_1 = (
    "{{- bos_token }}{%- set date_string = '26 Jul 2024' %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")

GEMMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}{{- '<end_of_turn>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}")

PHI4 = ("{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
        "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
        "message['content'] + '<|im_end|><|im_start|>assistant<|im_sep|>'}}{% elif (message['role'] == 'assistant') %}"
        "{{message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}")

PHI4_MINI = ("{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
             "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
             "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
             "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

GLM4 = ("[gMASK]<sop>{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
        "{%- endif %}{%- endfor %}{%- for message in messages if message.role != 'system' %}"
        "{%- if message.role == 'user' %}<|user|>\n{{ message.content }}"
        "{%- elif message.role == 'assistant' %}<|assistant|>\n{{ message.content }}{%- endif %}{%- endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@dataclass(frozen=True)
class NamedTemplate:
    """A built-in template with the special tokens its family uses (what the renderer passes in)."""

    jinja: str
    bos_token: str
    eos_token: str
    end_of_turn: str      # what closes an assistant turn (GLM-4: the next role tag)
    role_markers: tuple[str, str, str]   # system, user, assistant opening markers


NAMED_TEMPLATES: dict[str, NamedTemplate] = {
    "chatml": NamedTemplate(CHATML, "", "<|im_end|>", "<|im_end|>",
                            ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")),
    "smollm2": NamedTemplate(SMOLLM2, "<|im_start|>", "<|im_end|>", "<|im_end|>",
                             ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")),
    "qwen2.5": NamedTemplate(QWEN2_5, "", "<|im_end|>", "<|im_end|>",
                             ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")),
    "llama-3.1": NamedTemplate(LLAMA3_1, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>",
                               ("<|start_header_id|>system<|end_header_id|>\n\n",
                                "<|start_header_id|>user<|end_header_id|>\n\n",
                                "<|start_header_id|>assistant<|end_header_id|>\n\n")),
    "gemma-3": NamedTemplate(GEMMA3, "<bos>", "<eos>", "<end_of_turn>",
                             ("<start_of_turn>user\n", "<start_of_turn>user\n", "<start_of_turn>model\n")),
    "phi-4": NamedTemplate(PHI4, "<|endoftext|>", "<|im_end|>", "<|im_end|>",
                           ("<|im_start|>system<|im_sep|>", "<|im_start|>user<|im_sep|>",
                            "<|im_start|>assistant<|im_sep|>")),
    "phi-4-mini": NamedTemplate(PHI4_MINI, "<|endoftext|>", "<|endoftext|>", "<|end|>",
                                ("<|system|>", "<|user|>", "<|assistant|>")),
    "glm-4": NamedTemplate(GLM4, "[gMASK]", "<|endoftext|>", "<|user|>",
                           ("<|system|>\n", "<|user|>\n", "<|assistant|>\n")),
}


def render_named(messages: list[dict], name: str, add_generation_prompt: bool = False) -> str:
    """Render a conversation with a built-in template (no tokenizer needed).

    Raises:
        KeyError: for an unknown name (the message lists the known ones).
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    if name not in NAMED_TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; built-in: {sorted(NAMED_TEMPLATES)}")
    t = NAMED_TEMPLATES[name]
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=t.jinja,
                                        add_generation_prompt=add_generation_prompt,
                                        bos_token=t.bos_token, eos_token=t.eos_token)
    return rendered[0]


def template_source(template: str) -> str:
    """The Jinja text of a built-in template name or of a *.jinja file (relative to the repo root).

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if template.endswith(".jinja"):
        from tasks.recipe import repo_path

        return repo_path(template).read_text()
    if template not in NAMED_TEMPLATES:
        raise KeyError(f"unknown chat template {template!r}; built-in: {sorted(NAMED_TEMPLATES)}")
    return NAMED_TEMPLATES[template].jinja


def apply_template(tokenizer, template: str | None):
    """Give the tokenizer the template a run should use: its own ('model' or None), a named one, or a
    Jinja file.

    Raises:
        ValueError: the tokenizer has no template of its own and none was named.
    """
    if template in (None, "model"):
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer has no chat template; name one of {sorted(NAMED_TEMPLATES)} "
                             "(model.chat_template) or a *.jinja file")
        return tokenizer
    tokenizer.chat_template = template_source(template)
    return tokenizer


def render(messages: list[dict], tokenizer=None, template: str | None = None,
           add_generation_prompt: bool = False) -> str:
    """Render with a named template, else with the tokenizer's own one."""
    if template not in (None, "model"):
        return render_named(messages, template, add_generation_prompt)
    if tokenizer is None:
        raise ValueError("pass a tokenizer (its own template) or the name of a built-in template")
    apply_template(tokenizer, None)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def template_fingerprint(tokenizer) -> str:
    """Hash of what decides a rendering: the template text and the special tokens it uses. Put it in the
    cache key of anything cached downstream of a rendering, so a changed template invalidates it."""
    parts = [tokenizer.chat_template or "", str(tokenizer.bos_token), str(tokenizer.eos_token),
             str(getattr(tokenizer, "pad_token", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]
