"""Hub and local base models: `model.source: hf` (a Hub id at a revision) and `model.source: local` (a folder).

A Hub model is fetched once with `huggingface_hub.snapshot_download` into the standard HF cache
(HF_HOME / HF_HUB_CACHE): downloads resume where an interrupted one stopped, a second run downloads
nothing, and a run with the Hub unreachable (or HF_HUB_OFFLINE=1) uses the cached snapshot. The token
comes from a `HuggingFaceHubCredentials` block (`model.hub_token_block`, blocks/hub.py) or, without one,
from the standard HF_TOKEN / `hf auth login`. Only what training and export read is fetched (config,
weights in safetensors, tokenizer files, chat template), never a repository's other checkpoints.

Every failure is one `ModelSourceError` naming the id and what to do: gated, missing, a missing
revision, or the Hub unreachable with nothing cached. The metadata timeout is short
(`HUB_TIMEOUT_S`), so an unreachable Hub fails in seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# What a base model needs; `*.bin` only as a fallback for repos without safetensors.
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.jinja", "*.txt", "*.py"]
HUB_TIMEOUT_S = 10


class ModelSourceError(RuntimeError):
    """A base model that cannot be had; the message names it and what to do."""


def hub_credentials(block_name: str | None) -> tuple[str | None, str | None]:
    """(token, endpoint) from the named HuggingFaceHubCredentials block; (None, None) without a block,
    so huggingface_hub falls back to HF_TOKEN / the stored login and HF_ENDPOINT."""
    if not block_name:
        return None, None
    from blocks.hub import HuggingFaceHubCredentials

    try:
        block = HuggingFaceHubCredentials.load(block_name)
    except ValueError as exc:
        raise ModelSourceError(f"model.hub_token_block {block_name!r}: no such HuggingFaceHubCredentials block "
                               f"({exc}); save one with HuggingFaceHubCredentials(token='hf_...').save"
                               f"({block_name!r})") from None
    return block.token.get_secret_value(), block.endpoint


def fetch_hub_model(repo_id: str, revision: str, token: str | None = None, endpoint: str | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """The local snapshot folder of `repo_id` at `revision`, downloaded (or resumed) into the HF cache.

    Raises:
        ModelSourceError: gated, missing, unknown revision, or unreachable with nothing cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint,
                                        cache_dir=cache_dir, allow_patterns=MODEL_FILES,
                                        etag_timeout=HUB_TIMEOUT_S))
    except GatedRepoError:
        raise ModelSourceError(f"model {repo_id!r} is gated on {where}: accept its licence on the model page "
                               "with your account, then give the run a token of that account "
                               "(model.hub_token_block, or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"model {repo_id!r} has no revision {revision!r} on {where}: set model.revision "
                               "to a branch, tag or commit of that repository") from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"model {repo_id!r} was not found on {where} (or it is private and the token "
                               "cannot read it): check model.name, or give a token that can read it "
                               "(model.hub_token_block, or HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ModelSourceError(f"model {repo_id!r} (revision {revision!r}) could not be fetched: {where} is "
                               "unreachable and the HF cache has no copy; run once with network access (or "
                               "copy the model into the HF cache / a folder with model.source: local)") from None
    except HfHubHTTPError as exc:
        raise ModelSourceError(f"model {repo_id!r}: {where} answered {exc.response.status_code if exc.response is not None else '?'} "
                               f"({str(exc).splitlines()[0]}); try again later or use a local copy") from None
    if not (folder / "config.json").exists():
        raise ModelSourceError(f"model {repo_id!r} (revision {revision!r}) has no config.json: not a "
                               "transformers model repository")
    if not list(folder.glob("*.safetensors")):
        raise ModelSourceError(f"model {repo_id!r} (revision {revision!r}) has no safetensors weights; "
                               "convert it, or download it into a folder and use model.source: local")
    log.info("base model %s@%s at %s", repo_id, revision, folder)
    return folder


def local_model(folder: str | Path) -> Path:
    """A local HF folder (config.json, weights, tokenizer), checked before any work starts.

    Raises:
        ModelSourceError: the folder is missing or is not a transformers model folder.
    """
    from tasks.recipe import repo_path

    path = repo_path(folder)
    if not (path / "config.json").exists():
        raise ModelSourceError(f"model.name {str(folder)!r}: {path} is not a local HF model folder (no "
                               "config.json); point it at a folder saved with save_pretrained")
    if not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise ModelSourceError(f"model.name {str(folder)!r}: {path} has no weights (*.safetensors)")
    return path


def architecture(folder: Path) -> list[str]:
    """The `architectures` a model folder's config.json declares."""
    return json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
