"""W&B access shared by the callbacks and the ``cs336`` command: credentials, artifact references, version pruning.

Nothing here touches the network until a download is asked for, and that fails fast (one clear line) when W&B is
offline, disabled or has no credentials: ``wandb.Api()`` with a key but no network blocks for its whole timeout.
"""

from __future__ import annotations

import netrc
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning_cs336.callbacks._base import check_positive_int

__all__ = [
    "PROTECTED_ALIASES",
    "ArtifactUnavailableError",
    "has_wandb_credentials",
    "load_from_artifact",
    "prune_artifact_versions",
    "resolve_checkpoint",
    "select_versions_to_delete",
]

#: Aliases that ``keep_last_k`` never deletes.
PROTECTED_ALIASES: tuple[str, ...] = ("best", "latest")

# Lightning's own ``ckpt_path`` keywords, passed through untouched by :func:`resolve_checkpoint`.
_LIGHTNING_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")
# ``[entity/][project/]name:alias_or_version``: the forms ``wandb.Api().artifact`` accepts.
_ARTIFACT_REF = re.compile(r"^(?:[\w.-]+/){0,2}[\w.-]+:[\w.-]+$")


class ArtifactUnavailableError(RuntimeError):
    """An artifact reference could not be fetched (offline, no API key, no network, unknown artifact)."""


# --------------------------------------------------------------------------------------------------------------
# Artifact references


def has_wandb_credentials() -> bool:
    """Whether W&B credentials exist locally (``WANDB_API_KEY`` or a ``.netrc`` entry for the W&B host), without
    touching the network: ``wandb.Api()`` with a key but no network blocks for its whole timeout."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _unavailable(ref: str, reason: str) -> ArtifactUnavailableError:
    return ArtifactUnavailableError(
        f"cannot fetch artifact {ref!r}: {reason}; set WANDB_API_KEY and network, or pass a local checkpoint path"
    )


def load_from_artifact(ref: str, map_location: Any = "cpu", root: str | None = None, timeout_s: int = 60) -> Path:
    """Download a checkpoint artifact (e.g. ``entity/project/model-<run id>:best``) and return the checkpoint path.

    Fails fast, before any network call, when W&B is offline or disabled (``WANDB_MODE``) or no API key is configured
    (``WANDB_API_KEY`` or ``~/.netrc``).

    Args:
        ref: The artifact reference, optionally prefixed with ``wandb:``.
        map_location: Accepted for symmetry with ``torch.load``; the file is not loaded here (pass the returned path
            to ``torch.load(path, map_location=...)`` or ``trainer.fit(ckpt_path=...)``).
        root: Download directory (W&B's artifacts cache layout by default).
        timeout_s: HTTP timeout of the W&B API calls.

    Returns:
        The ``model.ckpt`` entry of the downloaded artifact (as logged by :class:`CheckpointArtifactLogger` and by
        ``WandbLogger(log_model=...)``), else its only ``.ckpt`` entry, else the download directory.

    Raises:
        ArtifactUnavailableError: If the artifact cannot be fetched; the message says why.
    """
    del map_location  # nothing is loaded here; see the docstring
    ref = ref[len("wandb:") :] if ref.startswith("wandb:") else ref
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun", "disabled"):
        raise _unavailable(ref, f"W&B is in {mode} mode (WANDB_MODE={mode})")
    if not has_wandb_credentials():
        raise _unavailable(ref, "no W&B API key (WANDB_API_KEY is unset and ~/.netrc has no W&B entry)")
    try:
        import wandb

        run = wandb.run
        if run is not None and not run.offline:
            # Inside a live run, ``use_artifact`` also records the lineage edge (like WandbLogger.download_artifact).
            artifact = run.use_artifact(ref)
        else:
            artifact = wandb.Api(timeout=timeout_s).artifact(ref)
        directory = Path(artifact.download(root=root))
    except Exception as err:  # any failure (auth, network, unknown name) gets the same actionable message
        raise _unavailable(ref, f"{type(err).__name__}: {err}") from err
    if (directory / "model.ckpt").exists():
        return directory / "model.ckpt"
    ckpts = sorted(directory.rglob("*.ckpt"))
    return ckpts[0] if len(ckpts) == 1 else directory


def resolve_checkpoint(ref_or_path: str | os.PathLike[str]) -> Path | str:
    """Turn a local path or a W&B artifact reference into something ``trainer.fit(ckpt_path=...)`` accepts.

    - An existing local path is returned as a :class:`~pathlib.Path`.
    - Lightning's own keywords (``"last"``, ``"best"``, ``"hpc"``, ``"registry"``, ``"registry:..."``) are returned
      unchanged.
    - ``wandb:<ref>`` and ``[entity/][project/]name:alias`` references are downloaded with
      :func:`load_from_artifact`.

    Example::

        trainer.fit(model, ckpt_path=resolve_checkpoint("my-team/cs336/model-1a2b3c4d:best"))

    Raises:
        ArtifactUnavailableError: If a reference cannot be fetched.
        FileNotFoundError: If it is neither an existing path nor an artifact reference.
    """
    text = os.fspath(ref_or_path)
    if text in _LIGHTNING_CKPT_KEYWORDS or text.startswith("registry:"):
        return text
    if text.startswith("wandb:"):
        return load_from_artifact(text)
    if os.path.exists(text):
        return Path(text)
    if _ARTIFACT_REF.match(text):
        return load_from_artifact(text)
    raise FileNotFoundError(
        f"checkpoint {text!r} is neither an existing file nor a W&B artifact reference "
        "(use 'entity/project/name:alias' or 'wandb:<ref>')"
    )


# --------------------------------------------------------------------------------------------------------------
# Artifact versions


def select_versions_to_delete(
    versions: Sequence[tuple[str, Sequence[str]]],
    keep_last_k: int,
    protected: Sequence[str] = PROTECTED_ALIASES,
) -> list[str]:
    """Choose which artifact versions ``keep_last_k`` deletes. A pure function, so it is testable offline.

    Args:
        versions: ``(version, aliases)`` pairs, oldest first (e.g. ``("v0", ["step-100"])``).
        keep_last_k: How many of the newest versions to keep whatever their aliases.
        protected: Versions carrying any of these aliases are never deleted (``best`` and ``latest`` by default).

    Returns:
        The versions to delete, oldest first: every version older than the newest ``keep_last_k`` that carries no
        protected alias.

    Raises:
        ValueError: If ``keep_last_k`` is not a positive integer.
    """
    check_positive_int("keep_last_k", keep_last_k)
    keep_protected = set(protected)
    older = versions[: max(len(versions) - keep_last_k, 0)]
    return [name for name, aliases in older if not keep_protected.intersection(aliases)]


def prune_artifact_versions(
    collection: str,
    keep_last_k: int,
    artifact_type: str = "model",
    protected: Sequence[str] = PROTECTED_ALIASES,
    timeout_s: int = 60,
) -> list[str]:
    """Delete the old versions of an artifact collection on the W&B server (online only).

    Use it after ``wandb sync`` of an offline run, where :class:`CheckpointArtifactLogger` cannot prune.

    Args:
        collection: ``entity/project/name``, e.g. ``"my-team/cs336/model-1a2b3c4d"``.
        keep_last_k: Versions to keep besides the protected ones (see :func:`select_versions_to_delete`).
        artifact_type: The artifact type.
        protected: Aliases whose versions are never deleted.
        timeout_s: HTTP timeout of the W&B API calls.

    Returns:
        The deleted versions (``"v3"``, ...).
    """
    import wandb

    api = wandb.Api(timeout=timeout_s)
    found = list(api.artifacts(artifact_type, collection))
    found.sort(key=lambda a: int(str(a.version).lstrip("v") or 0))
    doomed = set(select_versions_to_delete([(a.version, list(a.aliases)) for a in found], keep_last_k, protected))
    deleted = []
    for artifact in found:
        if artifact.version in doomed:
            artifact.delete(delete_aliases=False)
            deleted.append(artifact.version)
    return deleted
