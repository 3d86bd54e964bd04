"""SAEs named by Hugging Face hub repo: ``hf:OWNER/NAME[@REVISION][/SUBFOLDER]``.

Only the subfolder (and the repo's top-level ``config.json``, where sparsify keeps the model name) is
fetched, with ``huggingface_hub.snapshot_download``, imported only here. Files already in the local Hugging
Face cache load offline. Otherwise, offline (``HF_HUB_OFFLINE=1``) or without network, the error says the hub
could not be reached and how to download the folder by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import FormatError

PREFIX = "hf:"
_SPEC_RE = re.compile(r"^hf:(?P<repo>[\w.\-]+/[\w.\-]+)(?:@(?P<rev>[\w.\-]+))?(?:/(?P<sub>.+?))?/?$")


class HubUnavailableError(RuntimeError):
    """The SAE is not in the local Hugging Face cache and the hub cannot be reached (or refuses the repo)."""


def is_hub_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:OWNER/NAME[@REV][/SUB]`` → (repo id, revision, subfolder)."""
    m = _SPEC_RE.match(spec)
    if m is None:
        raise FormatError(f"{spec!r} is not a hub SAE name: expected hf:OWNER/NAME[@REVISION][/SUBFOLDER]")
    return m.group("repo"), m.group("rev"), m.group("sub")


def _manual(repo: str, rev: str | None, sub: str | None) -> str:
    include = f" --include '{sub}/*'" if sub else ""
    revision = f" --revision {rev}" if rev else ""
    where = f"DIR/{sub}" if sub else "DIR"
    command = f"hf download {repo}{include}{revision} --local-dir DIR"
    return f"`{command}` on a machine with network, then pass {where}"


def resolve(spec: str) -> Path:
    """The local folder (or file) holding the SAE named by ``spec``, downloading it if needed."""
    from saekit.models.loading import _hub_offline, _is_connection_error, _root_cause

    repo, rev, sub = parse(spec)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise HubUnavailableError(f"loading {spec} needs huggingface_hub: pip install huggingface_hub") from e
    patterns = [sub, f"{sub}/*", "config.json"] if sub else None
    offline = _hub_offline()
    try:
        root = Path(snapshot_download(repo, revision=rev, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:
        if offline or _is_connection_error(e):
            why = "HF_HUB_OFFLINE is set" if offline else f"connection failed: {_root_cause(e)}"
            raise HubUnavailableError(
                f"{spec}: not in the local Hugging Face cache and the hub could not be reached ({why}). "
                f"Download it with {_manual(repo, rev, sub)}."
            ) from e
        if isinstance(e, RepositoryNotFoundError):
            raise HubUnavailableError(
                f"{spec}: repo {repo!r} not found on the Hugging Face hub (or it is private/gated: log in "
                "with `hf auth login`)"
            ) from e
        if isinstance(e, HfHubHTTPError):
            raise HubUnavailableError(f"{spec}: the Hugging Face hub refused the download: {e}") from e
        raise
    target = root / sub if sub else root
    if not target.exists():
        raise FormatError(f"{spec}: repo {repo!r} has no {sub!r} (downloaded to {root})")
    return target
