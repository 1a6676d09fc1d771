"""The Hugging Face hub by name: `import-hf ORG/NAME` downloads a model, `export --push-to-hub ORG/NAME` uploads one.

Everything goes through huggingface_hub itself, so its cache (HF_HUB_CACHE / HF_HOME), its offline mode
(HF_HUB_OFFLINE=1: only what is cached), its token (HF_TOKEN, or `hf auth login`) and its endpoint apply
as they do for transformers. A download fetches only the files import-hf reads (HUB_FILES): config and
generation config, the safetensors weights (one file or an index and its shards), the tokenizer and its
side files; never pytorch_model.bin, ONNX or GGUF copies. Failures (no such repo, a gated or private one
without a token, a missing revision, offline without a cached copy, no network) are one line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from .. import UserError
from ..utils import first_line

# what import_hf reads from a model repo (top level only: fnmatch patterns of huggingface_hub's allow_patterns)
HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*-of-*.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_name(source: str | os.PathLike) -> bool:
    """Whether `source` names a hub repo (ORG/NAME) rather than a folder: it has that shape and no such path exists."""
    text = os.fspath(source)
    return bool(_NAME.fullmatch(text)) and not text.endswith((".", "..")) and not Path(text).exists()


def check_repo_id(repo_id: str, flag: str) -> None:
    """A one-line UserError unless `repo_id` has the shape of a hub name (ORG/NAME)."""
    if not _NAME.fullmatch(repo_id) or repo_id.endswith((".", "..")):
        raise UserError(f"{flag} {repo_id!r}: not a hub name (ORG/NAME)")


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise UserError(f"a hub name needs huggingface_hub ({e}): pip install 'scratchgpt[hf]'") from None
    return huggingface_hub


def download_model(repo_id: str, revision: Optional[str] = None) -> Path:
    """The local folder (huggingface_hub's cached snapshot) of model `repo_id` at `revision`, downloading only
    HUB_FILES where they are not cached already."""
    hub = _hub()
    from huggingface_hub import errors

    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except errors.GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its terms on the hub, then set HF_TOKEN (or `hf auth login`)") \
            from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such model on the hub (or it is private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo_id}: no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        raise UserError(f"{repo_id}{'@' + revision if revision else ''} is not in the hub cache and the hub cannot "
                        "be reached (offline: HF_HUB_OFFLINE, or no network)") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise UserError(f"{repo_id}: download failed ({first_line(e)})") from None


def push_folder(folder: Path, repo_id: str, *, private: bool = False, message: Optional[str] = None) -> str:
    """Upload `folder` as model repo `repo_id` (created if missing) in one commit; returns the commit's URL."""
    check_repo_id(repo_id, "--push-to-hub")
    hub = _hub()
    from huggingface_hub import errors

    api = hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                 commit_message=message or f"Upload {folder.name} (exported by scratchgpt)")
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"--push-to-hub {repo_id}: upload failed ({first_line(e)}; is HF_TOKEN set?)") from None
    return str(getattr(info, "commit_url", None) or repo_id)


