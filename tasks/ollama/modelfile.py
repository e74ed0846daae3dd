"""Ollama Modelfiles derived from the training tokenizer, never typed by hand.

TEMPLATE, SYSTEM and `PARAMETER stop` come from the tokenizer's own chat template: the template is
rendered with sentinel messages, cut into per-role prefixes and suffixes, rewritten as a Go template,
and accepted only if Ollama's rendering of it (tasks.ollama.gotemplate) equals the Jinja rendering exactly.
The stop strings are the special token that closes an assistant turn and the one that opens the next.

Two deployments (seeds 000/001 and 003):
  merged   FROM the merged GGUF (default)
  adapter  FROM the base + ADAPTER the LoRA GGUF, no merge; guarded by tasks.ollama.adapter_guard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task

from tasks.ollama.adapter_guard import (base_identity, check_adapter_deployable, gguf_metadata,
                                 quantized_training_reason)
from tasks.ollama.gotemplate import GoTemplateError
from tasks.ollama.prompt import render_ollama_chat
from tasks.recipe import Recipe
from tasks.run import RunFolder, atomic_write_json, atomic_write_text

_SENTINELS = {"system": "SLIPWAY-SYSTEM-7f1c", "user": "SLIPWAY-USER-2b9e", "assistant": "SLIPWAY-ASSISTANT-c45d",
              "user2": "SLIPWAY-USER-8d03"}


class ModelfileError(ValueError):
    """The chat template cannot be expressed as an Ollama TEMPLATE, a Modelfile cannot be parsed, or it names
    no local file to serve."""


# ------------------------------------------------------------------------------- chat format derivation

@dataclass(frozen=True)
class ChatFormat:
    """Per-role text around each message, as the tokenizer's chat template renders it."""

    preamble: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    stop: tuple[str, ...]          # end-of-turn token text first
    fold_system: bool = False      # no system role (Gemma): the system prompt opens the first user turn,
                                   # followed by suffix["system"]


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _after(text: str, marker: str) -> str:
    return text[text.index(marker) + len(marker):]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise ModelfileError(f"chat template: cannot isolate the {what} (renders {text!r}, expected it to start "
                             f"with {prefix!r}); it is not a per-message template Ollama can express")
    return text[len(prefix):]


def derive_chat_format(tokenizer) -> ChatFormat:
    """Cut the tokenizer's chat template into per-role prefixes/suffixes (validated later by re-rendering).

    Raises:
        ModelfileError: the template is not built from independent per-message blocks.
    """
    s = {k: {"role": k.rstrip("2"), "content": v} for k, v in _SENTINELS.items()}
    full = _render(tokenizer, [s["system"], s["user"], s["assistant"], s["user2"]], True)
    a_last = _render(tokenizer, [s["system"], s["user"], s["assistant"]], False)
    u_last = _render(tokenizer, [s["system"], s["user"]], False)
    u_gen = _render(tokenizer, [s["system"], s["user"]], True)
    sys_t, usr_t, ast_t, usr2_t = (_SENTINELS[k] for k in ("system", "user", "assistant", "user2"))
    eos = tokenizer.eos_token or ""
    if eos and u_last.endswith(eos) and a_last.endswith(eos) and eos not in _after(u_gen, usr_t):
        # Phi-4-mini: EOS closes a conversation rendered without a generation prompt (training rows), not a
        # turn; Ollama always renders with the generation prompt, so it is no part of a message block.
        u_last, a_last = u_last[:-len(eos)], a_last[:-len(eos)]
    head = full[:full.index(sys_t)]
    between_sys_user = full[full.index(sys_t) + len(sys_t):full.index(usr_t)]
    between_user_ast = full[full.index(usr_t) + len(usr_t):full.index(ast_t)]
    between_ast_user = full[full.index(ast_t) + len(ast_t):full.index(usr2_t)]
    suffix = {"assistant": _after(a_last, ast_t), "user": _after(u_last, usr_t)}
    generation_prompt = _strip_prefix(_after(u_gen, usr_t), suffix["user"], "generation prompt")
    prefix = {"assistant": _strip_prefix(between_user_ast, suffix["user"], "assistant header"),
              "user": _strip_prefix(between_ast_user, suffix["assistant"], "user header")}
    stop = stop_strings(tokenizer, suffix["assistant"], prefix["user"])
    if not between_sys_user.endswith(prefix["user"]):
        if head.endswith(prefix["user"]) and usr_t not in between_sys_user:
            # No system role (Gemma): the system prompt is written inside the first user turn, then a
            # separator, then the user's text.
            prefix["system"], suffix["system"] = "", between_sys_user
            return ChatFormat(head[:len(head) - len(prefix["user"])], prefix, suffix, generation_prompt, stop,
                              fold_system=True)
        raise ModelfileError("chat template: the system block is not followed by a plain user block")
    suffix["system"] = between_sys_user[:len(between_sys_user) - len(prefix["user"])]
    # Role headers usually differ only by the role name (ChatML: "<|im_start|>user\n").
    guess = prefix["user"].replace("user", "system", 1)
    if "user" in prefix["user"] and head.endswith(guess):
        prefix["system"], preamble = guess, head[:len(head) - len(guess)]
    else:
        prefix["system"], preamble = head, ""
    return ChatFormat(preamble, prefix, suffix, generation_prompt, stop)


def stop_strings(tokenizer, assistant_suffix: str, user_prefix: str) -> tuple[str, ...]:
    """The special token that closes an assistant turn, then the one that opens the next turn (if special).

    Raises:
        ModelfileError: the assistant turn does not end with a special token, so nothing could stop generation.
    """
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = tokenizer(assistant_suffix, add_special_tokens=False)["input_ids"]
    if not ids and tokenizer.eos_token_id in special:
        # No end-of-turn token (GLM-4): training ends each answer with EOS (tasks.train.worker.tokenize_row),
        # and the next role tag stops generation too.
        ids = [tokenizer.eos_token_id]
    if not ids or ids[0] not in special:
        raise ModelfileError(f"chat template: an assistant turn ends with {assistant_suffix!r}, not with a special "
                             "token; a deployed model would have no end-of-turn token to stop on")
    stops = [tokenizer.convert_ids_to_tokens(ids[0])]
    head = tokenizer(user_prefix, add_special_tokens=False)["input_ids"]
    if head and head[0] in special and tokenizer.convert_ids_to_tokens(head[0]) not in stops:
        stops.append(tokenizer.convert_ids_to_tokens(head[0]))
    return tuple(stops)


def go_template(fmt: ChatFormat) -> str:
    """The Ollama TEMPLATE for a chat format: one branch per role over .Messages, then the generation prompt.

    No `{{-` trim markers: they would eat the newlines that are part of the role headers.
    """
    if fmt.fold_system:
        # The first user turn (index 1 after a system message) opens with the system prompt.
        fold = ('{{ if eq $i 1 }}{{ with index $.Messages 0 }}{{ if eq .Role "system" }}{{ .Content }}'
                f'{fmt.suffix["system"]}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}')
        pieces = [fmt.preamble, "{{ range $i, $m := .Messages }}",
                  f'{{{{ if eq .Role "user" }}}}{fmt.prefix["user"]}{fold}{{{{ .Content }}}}{fmt.suffix["user"]}',
                  f'{{{{ else if eq .Role "assistant" }}}}{fmt.prefix["assistant"]}{{{{ .Content }}}}'
                  f'{fmt.suffix["assistant"]}']
    else:
        pieces = [fmt.preamble, "{{ range .Messages }}"]
        for i, role in enumerate(("system", "user", "assistant")):
            pieces.append(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
                          f"{fmt.prefix[role]}{{{{ .Content }}}}{fmt.suffix[role]}")
    pieces += ["{{ end }}{{ end }}", fmt.generation_prompt]
    text = "".join(pieces)
    literal = fmt.preamble + fmt.generation_prompt + "".join(fmt.prefix.values()) + "".join(fmt.suffix.values())
    if "{{" in literal or '"""' in literal:
        raise ModelfileError("chat template: its literal text contains '{{' or '\"\"\"', which a Modelfile "
                             "TEMPLATE cannot hold")
    return text


def verify_go_template(tokenizer, template: str, bos_stripped: str = "") -> None:
    """Ollama's rendering of `template` must equal the tokenizer's Jinja rendering, character for character
    (less a leading `bos_stripped`, the BOS text the model's tokenizer adds itself).

    Raises:
        ModelfileError: naming the probe conversation and the first differing character.
    """
    s = {k: {"role": k.rstrip("2"), "content": v} for k, v in _SENTINELS.items()}
    probes = [[s["system"], s["user"]], [s["system"], s["user"], s["assistant"], s["user2"]]]
    for probe in probes:
        want = _render(tokenizer, probe, True)
        want = want[len(bos_stripped):] if bos_stripped and want.startswith(bos_stripped) else want
        try:
            got = render_ollama_chat(template, probe, system=None)
        except GoTemplateError as exc:
            raise ModelfileError(f"derived TEMPLATE does not render: {exc}") from None
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ModelfileError(f"chat template cannot be expressed as an Ollama TEMPLATE: for roles "
                                 f"{[m['role'] for m in probe]} it renders {want[max(0, at - 20):at + 20]!r}, "
                                 f"the Go template {got[max(0, at - 20):at + 20]!r} (char {at})")


# ------------------------------------------------------------------------------------------- Modelfile

@dataclass
class Modelfile:
    """The instructions Slipway writes and reads back (docs/modelfile.mdx)."""

    from_: str
    template: str | None = None
    system: str | None = None
    adapter: str | None = None
    parameters: list[tuple[str, str]] = field(default_factory=list)
    license: str | None = None

    def render(self, header: str = "") -> str:
        for name, value in (("TEMPLATE", self.template), ("SYSTEM", self.system), ("LICENSE", self.license)):
            if value is not None and '"""' in value:
                raise ModelfileError(f'{name} contains \'"""\', which a Modelfile cannot quote')
        lines = [f"# {line}" for line in header.splitlines()]
        lines.append(f"FROM {self.from_}")
        if self.adapter:
            lines.append(f"ADAPTER {self.adapter}")
        if self.template is not None:
            lines.append(f'TEMPLATE """{self.template}"""')
        if self.system is not None:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f'PARAMETER {k} "{v}"' if k == "stop" else f"PARAMETER {k} {v}" for k, v in self.parameters]
        if self.license:
            lines.append(f'LICENSE """{self.license}"""')
        return "\n".join(lines) + "\n"

    @property
    def stop(self) -> list[str]:
        return [v for k, v in self.parameters if k == "stop"]

    @classmethod
    def parse(cls, text: str, strict: bool = True) -> "Modelfile":
        """Read a Modelfile: instructions are case-insensitive; values are bare, "quoted" or \"\"\"multi-line\"\"\".

        Args:
            strict: refuse instructions Slipway does not write (False for `ollama show` output, which
                may carry newer ones).

        Raises:
            ModelfileError: an unknown instruction (strict), an unclosed quote, or no FROM.
        """
        values: dict[str, str] = {}
        params: list[tuple[str, str]] = []
        pos = 0
        pattern = re.compile(r'[ \t]*(?:#[^\n]*|(\w+)[ \t]+("""(.*?)"""|"((?:[^"\\\n]|\\.)*)"|([^\n]*)))?\n?', re.S)
        while pos < len(text):
            m = pattern.match(text, pos)
            if m is None or m.end() == pos:
                raise ModelfileError(f"Modelfile: cannot parse {text[pos:pos + 40]!r}")
            pos = m.end()
            if not m.group(1):
                continue
            name = m.group(1).upper()
            value = m.group(3) if m.group(3) is not None else m.group(4) if m.group(4) is not None else m.group(5).strip()
            if name == "PARAMETER":
                key, _, raw = value.partition(" ")
                raw = raw.strip()
                params.append((key, raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw))
            elif name in ("FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "LICENSE"):
                values[name] = value
            elif strict and name not in ("MESSAGE", "REQUIRES"):
                raise ModelfileError(f"Modelfile: unknown instruction {name}")
        if "FROM" not in values:
            raise ModelfileError("Modelfile: no FROM instruction")
        return cls(from_=values["FROM"], template=values.get("TEMPLATE"), system=values.get("SYSTEM"),
                   adapter=values.get("ADAPTER"), parameters=params, license=values.get("LICENSE"))

    @classmethod
    def read(cls, path: Path) -> "Modelfile":
        """Parse a Modelfile Slipway wrote (strict)."""
        return cls.parse(Path(path).read_text())


def deployed_artifact(run: RunFolder | Path, modelfile: Modelfile) -> tuple[Path, Path | None]:
    """The GGUF (and LoRA GGUF) that the run's Modelfile deploys; FROM and ADAPTER are relative to deploy/.

    Raises:
        ModelfileError: FROM is not a local GGUF (and, with an ADAPTER, the export has no base GGUF to serve).
    """
    run = RunFolder(run)
    model = run.deployed(modelfile.from_)
    if not model.exists() and modelfile.adapter:
        # FROM an Ollama model: deploy checks it is the adapter's base; serve that base from the export.
        model = run.base_gguf
    if not model.exists():
        raise ModelfileError(f"Modelfile FROM {modelfile.from_!r} is not a local GGUF ({model}); "
                             "serving it needs the file")
    return model, run.deployed(modelfile.adapter) if modelfile.adapter else None


def build_modelfile(tokenizer, from_: str, system: str, adapter: str | None = None,
                    gguf_adds_bos: bool = False) -> Modelfile:
    """A Modelfile whose TEMPLATE, stop tokens and SYSTEM are the training ones; sampling is greedy, as evaluated.

    `gguf_adds_bos`: the GGUF's tokenizer adds BOS itself (`tokenizer.ggml.add_bos_token`), as Ollama's runner
    then does for every prompt; a template that writes the BOS text (Gemma, Llama-3) would give two, so the
    TEMPLATE leaves it out (llama.cpp's own chat path strips it the same way).

    Raises:
        ModelfileError: the chat template cannot be expressed as a Modelfile TEMPLATE.
    """
    fmt = derive_chat_format(tokenizer)
    bos = tokenizer.bos_token or ""
    stripped = bos if gguf_adds_bos and bos and fmt.preamble.startswith(bos) else ""
    if stripped:
        fmt = ChatFormat(fmt.preamble[len(bos):], fmt.prefix, fmt.suffix, fmt.generation_prompt, fmt.stop,
                         fmt.fold_system)
    template = go_template(fmt)
    verify_go_template(tokenizer, template, stripped)
    params = [("stop", s) for s in fmt.stop]
    # The evaluation that gated this model was greedy with no repetition penalty; Ollama's defaults
    # (temperature 0.8, repeat_penalty 1.1) would deploy a different decoder than the one measured.
    params += [("temperature", "0"), ("top_k", "1"), ("repeat_penalty", "1")]
    return Modelfile(from_=from_, template=template, system=system, adapter=adapter, parameters=params)


# ------------------------------------------------------------------------------------------------ task

@task(name="write-modelfile")
def write_modelfile(run_dir: RunFolder | Path, recipe: Recipe, ggufs: dict[str, str]) -> Path:
    """run/deploy/Modelfile for the recipe's deploy.artifact, with TEMPLATE/SYSTEM/stop from the training
    tokenizer (and deploy/modelfile.json: its mode, FROM, ADAPTER and stop); returns the Modelfile's path.

    Raises:
        ModelfileError: the chat template cannot be written as an Ollama TEMPLATE.
        ModelfileRefused: an ADAPTER deployment that the guards refuse.
    """
    from transformers import AutoTokenizer

    run = RunFolder(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.lora_dir)
    system = recipe.model.system_prompt
    header = (f"Slipway {recipe.name}: TEMPLATE, SYSTEM and stop come from the training tokenizer's chat "
              "template.\nCreate with: ollama create <name> -f Modelfile")
    served = Path(ggufs[recipe.export.serve_type] if recipe.deploy.artifact == "merged" else ggufs["base"])
    adds_bos = bool(gguf_metadata(served)[0].get("tokenizer.ggml.add_bos_token", False))
    if recipe.deploy.artifact == "merged":
        mf = build_modelfile(tokenizer, run.relative_to_deploy(run.gguf(recipe.export.serve_type)), system,
                             gguf_adds_bos=adds_bos)
    else:
        lora = Path(ggufs["lora"])
        trained_kv, _ = gguf_metadata(Path(ggufs["base"]))
        if recipe.deploy.ollama_base:
            # A registry model: its identity is checked against Ollama's /api/show at deploy time.
            from_, from_kv, from_tensors = recipe.deploy.ollama_base, trained_kv, None
        else:
            from_ = run.relative_to_deploy(run.base_gguf)
            from_kv, from_tensors = gguf_metadata(Path(ggufs["base"]))
        check_adapter_deployable(lora, base_identity(trained_kv), base_identity(from_kv), from_tensors,
                                 quantized_training_reason(recipe, run.lora_dir),
                                 recipe.deploy.allow_qlora_adapter)
        mf = build_modelfile(tokenizer, from_, system, adapter=run.relative_to_deploy(run.lora_gguf),
                             gguf_adds_bos=adds_bos)
    path = atomic_write_text(run.modelfile, mf.render(header))
    info = {"path": str(path), "mode": recipe.deploy.artifact, "from": mf.from_, "adapter": mf.adapter,
            "stop": mf.stop}
    atomic_write_json(run.modelfile_record, info)
    return path
