"""Prefect Block for Langfuse credentials: the alternative to LANGFUSE_* environment variables.

Register once with `prefect block register --module blocks.tracing`, save one with
`LangfuseCredentials(public_key="pk-lf-...", secret_key="sk-lf-...", base_url="https://cloud.langfuse.com").save("default")`,
and pass its name to a flow (`langfuse_block="default"`). The secret key is a `SecretStr`: shown as
'********' in the UI and logs, unwrapped only when the Langfuse client is built.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class LangfuseCredentials(Block):
    """Keys and URL of a Langfuse project (v4.59+ server for SDK v5)."""

    _block_type_name = "Langfuse Credentials"
    _block_type_slug = "langfuse-credentials"

    public_key: str = Field(..., description="pk-lf-...")
    secret_key: SecretStr = Field(..., description="sk-lf-...")
    base_url: str = Field("https://cloud.langfuse.com", description="Langfuse server URL.")
