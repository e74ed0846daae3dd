"""Prefect Block for the Hugging Face Hub: the token lives here, as a SecretStr, never in a recipe.

Register the type once with `prefect block register --module blocks.hub`, then save one:
    HuggingFaceHubCredentials(token="hf_...").save("hf-release")
and name it in the recipe (`release.hub_token_block: hf-release`). The token is unwrapped only when the
Hub client is built; it is shown as '********' in the UI and in logs.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class HuggingFaceHubCredentials(Block):
    """A Hugging Face access token (write scope to push models and datasets)."""

    _block_type_name = "Hugging Face Hub Credentials"
    _block_type_slug = "hugging-face-hub-credentials"

    token: SecretStr = Field(..., description="A Hugging Face access token with write access.")
    endpoint: str = Field("https://huggingface.co", description="Hub endpoint (a mirror or a private Hub).")

    def api(self):
        """An authenticated `huggingface_hub.HfApi`."""
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token.get_secret_value())
