"""Prefect Block for Together AI: the API key lives here, as a SecretStr, never in a recipe or a log.

Register the type once (`slipway deploy` does, or `prefect block register --module blocks.together`), then:
    TogetherCredentials(api_key="...").save("together")
and name it in the recipe (`together.credentials_block: together`). Without a block the engine reads
TOGETHER_API_KEY (and TOGETHER_BASE_URL) from the environment, as the official client does.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class TogetherCredentials(Block):
    """A Together AI API key, and the API root (the local Together-compatible service, for offline runs)."""

    _block_type_name = "Together Credentials"
    _block_type_slug = "together-credentials"

    api_key: SecretStr = Field(..., description="A Together AI API key.")
    base_url: str | None = Field(None, description="API root without /v1; None: Together's (or "
                                 "TOGETHER_BASE_URL).")
