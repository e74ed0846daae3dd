"""Prefect Blocks for LLM endpoints: one typed place for URLs, model names and secret keys.

Used by LLM-enhanced data synthesis and by the LLM baseline runner. Keys are `SecretStr`: they are
stored encrypted by Prefect, shown as '********' in the UI and in logs, and only unwrapped when the
client is built. Register the types once with `prefect block register --module blocks.llm`.
"""

from __future__ import annotations

import re
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

# Documented OpenAI-compatible base URLs of the providers the seeds use (Anthropic's is its
# OpenAI SDK compatibility endpoint). Tests point `base_url` at a local server instead.
PROVIDER_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "together": "https://api.together.xyz/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "anthropic": "https://api.anthropic.com/v1/",
    "openai-compatible": None,
}


class OpenAICompatibleEndpoint(Block):
    """Any endpoint that speaks OpenAI's chat-completions API: OpenAI, Together, DeepSeek, Anthropic
    (compatibility endpoint), vLLM, llama.cpp's server, Ollama's /v1."""

    _block_type_name = "OpenAI Compatible Endpoint"
    _block_type_slug = "openai-compatible-endpoint"

    provider: Literal["openai", "together", "deepseek", "anthropic", "openai-compatible"] = "openai-compatible"
    base_url: str | None = Field(None, description="Overrides the provider's documented base URL.")
    api_key: SecretStr = Field(SecretStr("none"), description="API key (local servers ignore it).")
    model: str = Field(..., description="Model name sent with each request.")
    input_cost_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens (cost estimates).")
    output_cost_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens.")
    timeout_s: float = Field(60.0, gt=0)
    extra_body: dict = Field(default_factory=dict, description="Extra JSON fields sent with every request, "
                             "e.g. llama.cpp's greedy sampler settings {'top_k': 1, 'repeat_penalty': 1.0}; "
                             "leave empty for hosted APIs, which reject unknown fields.")

    def resolved_base_url(self) -> str:
        url = self.base_url or PROVIDER_BASE_URLS[self.provider]
        if not url:
            raise ValueError(f"block {self._block_document_name or ''!r}: provider 'openai-compatible' needs base_url")
        return url

    def client(self, max_retries: int = 0):
        """An `openai.OpenAI` client; retries are left to the caller (who honours Retry-After)."""
        from openai import OpenAI

        return OpenAI(base_url=self.resolved_base_url(), api_key=self.api_key.get_secret_value(),
                      timeout=self.timeout_s, max_retries=max_retries)


class AzureOpenAIEndpoint(Block):
    """Azure OpenAI: the deployment-based API (`api_version` set) or the v1 API (`api_version` None)."""

    _block_type_name = "Azure OpenAI Endpoint"
    _block_type_slug = "azure-openai-endpoint"

    endpoint: str = Field(..., description="https://<resource>.openai.azure.com")
    deployment: str = Field(..., description="The deployment name (sent as `model`).")
    api_key: SecretStr
    api_version: str | None = Field(None, description="e.g. '2024-10-21' for the deployment-based API; "
                                    "None for the v1 API at {endpoint}/openai/v1/.")
    input_cost_per_mtok: float = Field(0.0, ge=0)
    output_cost_per_mtok: float = Field(0.0, ge=0)
    timeout_s: float = Field(60.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _resource_root(cls, value: str) -> str:
        """Accept the resource root, or a URL copied from the portal that already ends in
        /openai/deployments/<name>/... or /openai/v1: the client adds those paths itself."""
        root = re.split(r"/openai(/|$)", value.rstrip("/"), maxsplit=1)[0]
        if not re.match(r"^https?://[^/]+", root):
            raise ValueError(f"endpoint {value!r}: expected https://<resource>.openai.azure.com")
        return root

    @property
    def model(self) -> str:
        return self.deployment

    def client(self, max_retries: int = 0):
        from openai import AzureOpenAI, OpenAI

        key = self.api_key.get_secret_value()
        if self.api_version:
            # Requests go to {endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...
            return AzureOpenAI(azure_endpoint=self.endpoint.rstrip("/"), api_version=self.api_version,
                               api_key=key, timeout=self.timeout_s, max_retries=max_retries)
        return OpenAI(base_url=self.endpoint.rstrip("/") + "/openai/v1/", api_key=key,
                      timeout=self.timeout_s, max_retries=max_retries)


LLMEndpoint = OpenAICompatibleEndpoint | AzureOpenAIEndpoint
