"""Built-in chat templates against reference renderings."""

import importlib.resources
import typing

import pytest

from tasks.models.chat_templates import NAMED_TEMPLATES, apply_template, render, render_named, template_fingerprint
from tasks.recipe import ModelConfig

THREE_TURNS = [{"role": "system", "content": "You are terse."},
               {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "Status?"}, {"role": "assistant", "content": "All green."},
               {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Any time."}]
# llama.cpp tests/test-chat-template.cpp renders this conversation with each family's official template.
LLAMA_CPP_CHAT = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi there"}, {"role": "user", "content": "Who are you"},
                  {"role": "assistant", "content": "   I am an assistant   "},
                  {"role": "user", "content": "Another question"}]


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.mark.parametrize("name, original", [("qwen2.5", "qwen2_5"), ("llama-3.1", "llama3_1"),
                                            ("gemma-3", "gemma3")])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_plain_chat_renders_like_the_official_template(name, original, generation_prompt):
    from transformers.utils.chat_template_utils import render_jinja_template

    official = (importlib.resources.files("trl") / "chat_templates" / f"{original}.jinja").read_text()
    t = NAMED_TEMPLATES[name]
    for conversation in (THREE_TURNS, THREE_TURNS[1:], LLAMA_CPP_CHAT):
        expected = render_jinja_template(conversations=[conversation], chat_template=official,
                                         add_generation_prompt=generation_prompt, bos_token=t.bos_token,
                                         eos_token=t.eos_token)[0][0]
        assert render_named(conversation, name, generation_prompt) == expected


def test_phi4_and_glm4_match_llama_cpp_reference_renderings():
    assert render_named(LLAMA_CPP_CHAT, "phi-4", add_generation_prompt=True) == (
        "<|im_start|>system<|im_sep|>You are a helpful assistant<|im_end|><|im_start|>user<|im_sep|>Hello<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hi there<|im_end|><|im_start|>user<|im_sep|>Who are you<|im_end|>"
        "<|im_start|>assistant<|im_sep|>   I am an assistant   <|im_end|><|im_start|>user<|im_sep|>Another question"
        "<|im_end|><|im_start|>assistant<|im_sep|>")
    # llama.cpp's ChatGLM4 case (glm-4-9b-chat) ends the generation prompt with a newline; GLM-4-0414 does not.
    assert render_named(LLAMA_CPP_CHAT, "glm-4", add_generation_prompt=True) + "\n" == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there<|user|>\n"
        "Who are you<|assistant|>\n   I am an assistant   <|user|>\nAnother question<|assistant|>\n")


def test_smollm2_and_chatml_match_the_embedded_tokenizer(tokenizer):
    for conversation in (THREE_TURNS, THREE_TURNS[1:]):
        for generation_prompt in (True, False):
            own = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation_prompt)
            assert render_named(conversation, "smollm2", generation_prompt) == own
            assert render(conversation, tokenizer, None, generation_prompt) == own
    assert render_named(THREE_TURNS, "chatml") == tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)


# How often each template's end-of-turn token occurs in THREE_TURNS (7 messages; Gemma folds the system
# prompt into the first user turn; GLM-4 has no end token and its turns end at the next <|user|>).
STRUCTURE = {"chatml": 7, "smollm2": 7, "qwen2.5": 7, "llama-3.1": 7, "gemma-3": 6, "phi-4": 7, "phi-4-mini": 7,
             "glm-4": 3}


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
def test_each_template_renders_a_three_turn_conversation_with_its_markers(name):
    t = NAMED_TEMPLATES[name]
    text = render_named(THREE_TURNS, name)
    _, user, assistant = t.role_markers
    assert text.count(assistant) == 3
    assert text.count(user) == 3                               # Gemma folds the system prompt into the first
    assert text.count(t.end_of_turn) == STRUCTURE[name]        # GLM-4: turns end where the next <|user|> begins
    positions = [text.index(m["content"].strip()) for m in THREE_TURNS]
    assert positions == sorted(positions)
    for turn in THREE_TURNS[2::2]:                              # every assistant turn follows its marker
        assert assistant + turn["content"] in text
    if t.bos_token and name not in ("phi-4", "phi-4-mini", "smollm2", "glm-4"):
        assert text.startswith(t.bos_token)
    prompt = render_named(THREE_TURNS[:-1], name, add_generation_prompt=True)
    assert prompt.endswith(assistant if name != "glm-4" else "<|assistant|>")   # GLM-4-0414: no newline yet


def test_fingerprint_follows_the_template_and_unknown_names_fail(tokenizer):
    before = template_fingerprint(tokenizer)
    original = tokenizer.chat_template
    try:
        apply_template(tokenizer, "qwen2.5")
        assert template_fingerprint(tokenizer) != before
    finally:
        tokenizer.chat_template = original
    assert template_fingerprint(tokenizer) == before
    with pytest.raises(KeyError, match="unknown chat template 'mistral'; built-in: "):
        apply_template(tokenizer, "mistral")


def test_the_recipe_accepts_exactly_the_built_in_names_and_jinja_files(tmp_path):
    from tasks.recipe import CHAT_TEMPLATE_NAMES

    assert list(CHAT_TEMPLATE_NAMES) == list(NAMED_TEMPLATES)
    for name in ["model", *NAMED_TEMPLATES]:
        assert ModelConfig(chat_template=name).chat_template == name
    with pytest.raises(ValueError, match="'mistral': 'model', one of"):
        ModelConfig(chat_template="mistral")
    with pytest.raises(ValueError, match="no such Jinja file"):
        ModelConfig(chat_template=str(tmp_path / "missing.jinja"))
    jinja = tmp_path / "mine.jinja"
    jinja.write_text(NAMED_TEMPLATES["chatml"].jinja)
    tokenizer = type("Tok", (), {"chat_template": None})()
    apply_template(tokenizer, ModelConfig(chat_template=str(jinja)).chat_template)
    assert tokenizer.chat_template == NAMED_TEMPLATES["chatml"].jinja
