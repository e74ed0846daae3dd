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

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

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


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str, endpoint: str | None) -> Iterator[None]:
    """Turn huggingface_hub's failures into one ModelSourceError naming the model and what to do."""
    from huggingface_hub.errors import (DryRunError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        try:
            yield
        except DryRunError as exc:
            # A dry run wraps why the repo could not be read (not found, gated, or no connection).
            raise exc.__cause__ if isinstance(exc.__cause__, HfHubHTTPError) else exc
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
    except (LocalEntryNotFoundError, DryRunError):
        raise ModelSourceError(f"model {repo_id!r} (revision {revision!r}) could not be fetched: {where} is "
                               "unreachable and the HF cache has no copy; run once with network access (or "
                               "copy the model into the HF cache / a folder with model.source: local)") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise ModelSourceError(f"model {repo_id!r}: {where} answered HTTP {status} ({str(exc).splitlines()[0]}); "
                               "try again later, or use a local copy (model.source: local)") from None


def cached_snapshot(repo_id: str, revision: str, cache_dir: str | Path | None = None) -> Path | None:
    """The HF cache's snapshot of repo_id@revision when it holds a complete model (config + weights), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                        allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        return None
    return folder if (folder / "config.json").exists() and list(folder.glob("*.safetensors")) else None


def check_hub_model(repo_id: str, revision: str, token: str | None = None, endpoint: str | None = None,
                    cache_dir: str | Path | None = None) -> list:
    """Before a run starts: the model is cached, or the Hub lets this token download it (a dry run of the
    download: file list and a HEAD per file, nothing fetched). Returns the dry-run file entries ([] when cached).

    Raises:
        ModelSourceError: gated, missing, unknown revision, or unreachable with nothing cached.
    """
    from huggingface_hub import snapshot_download

    if cached_snapshot(repo_id, revision, cache_dir) is not None:
        return []
    with hub_errors(repo_id, revision, endpoint):
        return snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir,
                                 allow_patterns=MODEL_FILES, etag_timeout=HUB_TIMEOUT_S, dry_run=True)


def check_model_source(cfg) -> None:
    """The recipe's base model can be had: a local folder that is a model, or a Hub model that is cached or
    downloadable with the configured token (embedded sources are checked when they are converted).

    Raises:
        ModelSourceError: one message naming the model and what to do.
    """
    from tasks.recipe import repo_path

    if cfg.source == "local" or (cfg.source == "hf" and repo_path(cfg.name).is_dir()):
        local_model(cfg.name)
    elif cfg.source == "hf":
        token, endpoint = hub_credentials(cfg.hub_token_block)
        check_hub_model(cfg.name, cfg.revision, token=token, endpoint=endpoint)


def fetch_hub_model(repo_id: str, revision: str, token: str | None = None, endpoint: str | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """The local snapshot folder of `repo_id` at `revision`, downloaded (or resumed) into the HF cache.

    Raises:
        ModelSourceError: gated, missing, unknown revision, or unreachable with nothing cached.
    """
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision, endpoint):
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, endpoint=endpoint,
                                        cache_dir=cache_dir, allow_patterns=MODEL_FILES,
                                        etag_timeout=HUB_TIMEOUT_S))
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
