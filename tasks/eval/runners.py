"""Model runners behind one interface: `runner.run(requests) -> completions`, greedy by default.

    HFRunner        a local transformers model (optionally with a LoRA adapter), batched left-padded generation
    EndpointRunner  anything with an OpenAI chat-completions API, configured by a Prefect Block:
                    `OpenAICompatibleEndpoint` (vLLM, llama.cpp's server, Ollama's /v1, OpenAI, Together, ...)
                    or `AzureOpenAIEndpoint` (deployment-based with api-version, or the v1 endpoint);
                    concurrent requests from a thread pool
    llama_cpp_runner  llama.cpp: starts `llama-server` on a GGUF and yields an EndpointRunner on it
    served_model_runner  an EndpointRunner on a llama.cpp-style server that is already running

Every runner answers with `tasks.llm_client.Completion`; endpoints go through `tasks.llm_client.complete`
(the project's one chat-completions path) with the evaluation retry policy.

A runner reports each call to an optional observer (`tasks.tracing`) as it starts and ends, so latency is
measured around the real call: per request for endpoints, per batch for HF (every row of a batch waits
for the whole batch). llama.cpp in-process (llama-cpp-python) is not offered: its wheel compiles for ~10
minutes here and the server runs the same engine.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from blocks.llm import OpenAICompatibleEndpoint
from tasks.data.evalfile import prompt_messages
from tasks.llamacpp.serve import ManagedLlamaServer
from tasks.llm_client import EVAL_RETRIES, APIRequestError, Completion, RetryPolicy, complete
from tasks.tasktypes import task_of

log = logging.getLogger("slipway.eval")

# llama.cpp's default samplers (top_k 40, repeat_penalty 1.1, ...) change a tiny model's greedy answer.
LLAMA_CPP_GREEDY = {"top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}


@dataclass(frozen=True)
class Request:
    """One chat request: the prompt turns plus what a native structured/tool-call API needs."""

    row_id: str
    messages: list[dict]
    json_schema: dict | None = None
    tools: list[dict] | None = None


class Observer(Protocol):
    """Called around each model call (tracing); `start` returns a handle with `end(...)`."""

    def start(self, request: Request): ...
    def end(self, handle, request: Request, completion: Completion) -> None: ...


class Runner(Protocol):
    label: str
    model: str
    kind: str

    def run(self, requests: list[Request], observer: Observer | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[Completion]: ...


def requests_from_rows(rows: list[dict]) -> list[Request]:
    """Chat rows (tasks.data.evalfile.to_chat_row / tasks.data.prepare.to_messages) to requests."""
    return [Request(row_id=str(r.get("id", i)), messages=prompt_messages(r), **task_of(r).request_fields(r))
            for i, r in enumerate(rows)]


@dataclass
class HFRunner:
    """Greedy, batched generation with transformers; prompts sorted by length so batches pad little."""

    model_dir: Path
    label: str
    max_new_tokens: int
    batch_size: int = 8
    adapter_dir: Path | None = None
    model: str = ""
    kind: str = "transformers"
    _loaded: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        self.model = self.model or Path(self.model_dir).name + (f"+{Path(self.adapter_dir).parent.name}-lora"
                                                               if self.adapter_dir else "")

    def load(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._loaded is None:
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, padding_side="left")
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            if self.adapter_dir is not None:
                from peft import PeftModel
                model = PeftModel.from_pretrained(model, self.adapter_dir)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self._loaded = (model.to(device).eval(), tokenizer, device)
        return self._loaded

    def run(self, requests, observer=None, progress=None):
        import torch

        model, tokenizer, device = self.load()
        eos_ids = list({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
        prompts = [tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                   for r in requests]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            handles = {i: observer.start(requests[i]) for i in idx} if observer else {}
            began = time.perf_counter()
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            with torch.inference_mode():
                generated = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                           eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
            latency = time.perf_counter() - began
            new = generated[:, batch["input_ids"].shape[1]:]
            for row, (i, seq) in enumerate(zip(idx, new)):
                kept = [t for t in seq.tolist() if t != tokenizer.pad_token_id and t not in eos_ids]
                out[i] = Completion(text=tokenizer.decode(kept, skip_special_tokens=True), latency_s=latency,
                                    prompt_tokens=int(batch["attention_mask"][row].sum()),
                                    completion_tokens=len(kept))
                if observer:
                    observer.end(handles[i], requests[i], out[i])
            if progress:
                progress(min(start + self.batch_size, len(order)), len(order))
        return out


class EndpointError(RuntimeError):
    """Calls to the endpoint failed."""


class FailedCalls(EndpointError):
    """More calls failed than the evaluation tolerates (`eval.max_failed_calls`); the message gives the count."""


def check_failed_calls(label: str, errors: list[str | None], tolerance: int, setting: str = "") -> None:
    """Refuse an evaluation with more failed calls than `tolerance` (`errors`: one per call, None when it
    succeeded): a failed call would otherwise be scored as a wrong answer and the gates would judge a
    degraded number.

    Raises:
        FailedCalls: '<label>: N of M calls failed (<setting or tolerance>); first: <redacted error>'.
    """
    failed = [e for e in errors if e]
    if len(failed) > tolerance:
        raise FailedCalls(f"{label}: {len(failed)} of {len(errors)} calls failed ({setting or f'tolerance {tolerance}'}"
                          f"); first: {failed[0]}")


class EndpointConfigError(EndpointError):
    """The endpoint refused the configuration (bad key, URL, deployment, request shape): retrying cannot help."""


@dataclass
class EndpointRunner:
    """Chat completions through an endpoint Block, `concurrency` requests at a time.

    Greedy: temperature 0 and a fixed seed; the block's `extra_body` adds server-specific sampler fields.
    `structured_output='json_schema'` sends the row's schema as `response_format` (OpenAI/Azure structured
    outputs, llama.cpp grammar); `tool_calling='native'` sends `tools` and reads `tool_calls`. Otherwise
    the schema and tools are only in the prompt, exactly as the SLM sees them. Transient failures are
    retried as `retry` says; a call that still fails is recorded with its (redacted) error and counted:
    `check_failed_calls` decides whether the evaluation may go on.
    """

    endpoint: object
    label: str
    max_new_tokens: int
    concurrency: int = 4
    structured_output: str = "prompt"
    tool_calling: str = "prompt"
    kind: str = ""
    model: str = ""
    retry: RetryPolicy = EVAL_RETRIES

    def __post_init__(self):
        self.model = self.model or self.endpoint.model
        self.kind = self.kind or type(self.endpoint).__name__

    def _response_format(self, request: Request) -> dict | None:
        if self.structured_output != "json_schema" or not (request.json_schema or request.tools):
            return None
        schema = request.json_schema or {"anyOf": [
            {"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
             "required": ["name", "arguments"]} for t in request.tools]}
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": False}}

    def _ask(self, client, request: Request) -> Completion:
        began = time.perf_counter()
        try:
            return complete(self.endpoint, request.messages, max_tokens=self.max_new_tokens, temperature=0.0,
                            seed=0, response_format=self._response_format(request),
                            tools=request.tools if self.tool_calling == "native" else None,
                            extra_body=getattr(self.endpoint, "extra_body", None), retry=self.retry, client=client)
        except APIRequestError as exc:
            if exc.status in (400, 401, 403, 404):   # configuration, not bad luck: stop at once
                raise EndpointConfigError(f"{self.label}: {type(self.endpoint).__name__} refused the request "
                                          f"({exc.status}): {exc}") from None
            return Completion("", time.perf_counter() - began, error=str(exc))

    def run(self, requests, observer=None, progress=None):
        done = 0

        def one(client, request: Request) -> Completion:
            nonlocal done
            handle = observer.start(request) if observer else None
            completion = self._ask(client, request)
            if observer:
                observer.end(handle, request, completion)
            done += 1
            if progress:
                progress(done, len(requests))
            return completion

        with self.endpoint.client(max_retries=0) as client, ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda request: one(client, request), requests))


def served_model_runner(base_url: str, served_model: str, max_new_tokens: int, concurrency: int = 2,
                        label: str | None = None, timeout_s: float = 300, api_key: str | None = None,
                        **runner_kwargs) -> EndpointRunner:
    """A greedy runner on a llama.cpp-style OpenAI-compatible server that is already running.

    `served_model` is the name the server answers to; `runner_kwargs` may set the runner's own `model`
    (the name reports show, e.g. the GGUF file's)."""
    endpoint = OpenAICompatibleEndpoint(base_url=base_url, model=served_model, timeout_s=timeout_s,
                                        extra_body=LLAMA_CPP_GREEDY, **({"api_key": api_key} if api_key else {}))
    return EndpointRunner(endpoint, label or served_model, max_new_tokens, concurrency=concurrency, **runner_kwargs)


def generate_openai(base_url: str, model: str, rows: list[dict], max_new_tokens: int, concurrency: int = 2,
                    api_key: str | None = None) -> tuple[list[str], int]:
    """Greedy answers to chat rows from a running server, and their completion tokens (deploy smoke tests).

    Raises:
        FailedCalls: any call failed.
    """
    runner = served_model_runner(base_url, model, max_new_tokens, concurrency, timeout_s=120, api_key=api_key)
    completions = runner.run(requests_from_rows(rows))
    check_failed_calls(runner.label, [c.error for c in completions], 0)
    return [c.text for c in completions], sum(c.completion_tokens or 0 for c in completions)


@dataclass
class ServedRunner(EndpointRunner):
    """An EndpointRunner on a llama-server this process manages: calls that failed because the server
    crashed are asked again, once, after the server was restarted (within its restart budget)."""

    server: ManagedLlamaServer | None = None

    def run(self, requests, observer=None, progress=None):
        results = super().run(requests, observer, progress)
        failed = [i for i, c in enumerate(results) if c.error]
        if not failed or self.server is None or not self.server.ensure_running():
            return results
        log.warning("%s: llama-server was down (%d calls failed; restarted, %d/%d restarts); asking those again",
                    self.label, len(failed), self.server.restarts, self.server.max_restarts)
        again = super().run([requests[i] for i in failed], observer)
        for i, completion in zip(failed, again):
            results[i] = completion
        return results


@contextlib.contextmanager
def llama_cpp_runner(gguf_path: Path, log_path: Path, label: str, max_new_tokens: int, parallel: int = 2,
                     host: str = "127.0.0.1", port: int = 0, model: str | None = None,
                     lora_path: Path | None = None, request_timeout_s: float = 300,
                     grammar_file: Path | None = None, **runner_kwargs) -> Iterator[EndpointRunner]:
    """llama.cpp's OpenAI-compatible server on a GGUF for the block's duration, with a runner on it that
    restarts a crashed server before giving up on its calls; `grammar_file` constrains every answer
    (deploy.constrain_output)."""
    with ManagedLlamaServer(Path(gguf_path), log_path, alias=label, host=host, port=port, parallel=parallel,
                            lora_path=lora_path, grammar_file=grammar_file) as server:
        endpoint = OpenAICompatibleEndpoint(base_url=server.base_url, model=server.alias, timeout_s=request_timeout_s,
                                            extra_body=LLAMA_CPP_GREEDY)
        yield ServedRunner(endpoint, label, max_new_tokens, concurrency=parallel, kind="llama.cpp server",
                           model=model or Path(gguf_path).name, server=server, **runner_kwargs)
