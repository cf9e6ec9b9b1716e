"""The Hugging Face hub, asked once and quickly whether it can give a model or a dataset.

Before anything is created or loaded, a run checks that its pipeline and its COCO captions can be had:
from the local cache, or from the hub when it is online. Without network, diffusers and datasets
retry for about 40 s and then blame whichever came first; one request here, with a short timeout,
says in one line what is missing and why.

"""

from __future__ import annotations

PROBE_TIMEOUT = 10  # seconds for the one request that asks the hub about a repository


def offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``, read once when huggingface_hub loads)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cached(repo_id: str, repo_type: str = "model") -> str | None:
    """The local snapshot of ``repo_id`` in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or a broken cache entry: not usable either way
        return None


def unavailable(repo_id: str, repo_type: str = "model") -> str | None:
    """Why the hub cannot give ``repo_id`` now (None: it can): it cannot be reached, has no such
    repository, or keeps it gated. One request, :data:`PROBE_TIMEOUT` seconds at most."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=PROBE_TIMEOUT)
    except GatedRepoError:
        return f"the {kind} {repo_id} is gated on the hub: accept its terms there and log in (hf auth login)"
    except RepositoryNotFoundError:
        return f"no {kind} {repo_id} on the hub at {endpoint()} (or it is private: log in)"
    except HfHubHTTPError as e:
        return f"the hub at {endpoint()} answered {_first(e)}"
    except Exception as e:  # noqa: BLE001 - no network, refused, timed out, no DNS: the hub cannot be reached
        return f"the hub at {endpoint()} cannot be reached ({_first(e)})"
    return None


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__
