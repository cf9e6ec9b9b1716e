"""The study's images, kept as Optuna artifacts: the baseline's (one per prompt) and each trial's first
``--images-per-trial``. optuna-dashboard shows them, the report's image grid embeds them, and a resumed
run or another worker compares its trials with the baseline's.

Images are named ``<prefix>-<i>.png``: ``baseline-<i>.png`` on the study, ``trial<N>-<i>.png`` on trial N.

Example:
    >>> artifact_dir_for("sqlite:///studies/optimize-sd.db")
    'studies/optimize-sd-artifacts'
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings

BASELINE_PREFIX = "baseline"  # the study's artifacts baseline-0.png, baseline-1.png, ...: one per prompt


def trial_prefix(number: int) -> str:
    """The name prefix of trial ``number``'s images (``trial3-0.png``, ...)."""
    return f"trial{number}"


def artifact_dir_for(url: str, artifact_dir: str | None = None) -> str:
    """Where trial images are kept: ``--artifact-dir``, else beside a SQLite file
    (``studies/optimize-sd.db`` -> ``studies/optimize-sd-artifacts``), else ``studies/artifacts``."""
    if artifact_dir:
        return artifact_dir
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        return os.path.splitext(url[len("sqlite:///"):])[0] + "-artifacts"
    return os.path.join("studies", "artifacts")


def compile_cache_for(url: str) -> str:
    """Where compiled UNet code is kept between runs of a study's storage (inductor's on-disk caches):
    beside a SQLite file (``studies/optimize-sd.db`` -> ``studies/optimize-sd-compile-cache``), else
    ``studies/compile-cache``; one per machine for a shared PostgreSQL storage."""
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        return os.path.splitext(url[len("sqlite:///"):])[0] + "-compile-cache"
    return os.path.join("studies", "compile-cache")


def artifact_store(directory: str, create: bool = True):
    """The store of the images in ``directory``; ``create=False`` for readers, which make no directory.
    Its writes are atomic: Optuna's left a half-written file on a full disk, taking the last space."""
    from optuna.artifacts import FileSystemArtifactStore

    from .files import atomic_write

    class AtomicStore(FileSystemArtifactStore):
        def write(self, artifact_id, content_body) -> None:
            checked = getattr(self, "_get_filepath", None)  # refuses ids that leave the directory (Optuna 4.2+)
            path = checked(artifact_id) if checked else os.path.join(directory, artifact_id)
            atomic_write(str(path), content_body.read())

    if create:
        os.makedirs(directory, exist_ok=True)
    return AtomicStore(directory)


def upload_images(images, study_or_trial, store, prefix: str, indices=None) -> list[str]:
    """Upload PIL images as PNG artifacts of a trial or study (optuna-dashboard shows them), named
    ``PREFIX-<i>.png`` with ``i`` from ``indices`` (default 0, 1, ...); their ids."""
    from optuna.artifacts import upload_artifact

    ids = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in zip(range(len(images)) if indices is None else indices, images):
            path = os.path.join(tmp, f"{prefix}-{i}.png")  # the dashboard shows the file name
            image.save(path)
            ids.append(upload_artifact(artifact_store=store, file_path=path, study_or_trial=study_or_trial,
                                       mimetype="image/png"))
    return ids




def image_ids(study_or_trial, prefix: str, storage=None) -> dict[int, str]:
    """Artifact ids of ``PREFIX-<i>.png`` images of a study or trial by ``i`` (the first upload of each)."""
    from optuna.artifacts import get_all_artifact_meta

    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental in Optuna
        metas = get_all_artifact_meta(study_or_trial, storage=storage)
    ids: dict[int, str] = {}
    for meta in metas:
        m = pattern.fullmatch(meta.filename)
        if m:
            ids.setdefault(int(m.group(1)), meta.artifact_id)
    return dict(sorted(ids.items()))


def baseline_image_ids(study) -> dict[int, str]:
    return image_ids(study, BASELINE_PREFIX)


def read_image(store, artifact_id: str):
    """One stored image as an RGB PIL image (raises OSError, or the store's not-found error)."""
    from PIL import Image

    with store.open_reader(artifact_id) as f:
        image = Image.open(io.BytesIO(f.read()))
        return image.convert("RGB")


def load_baseline_images(study, store, n: int) -> list | None:
    """The study's ``n`` baseline images in prompt order, or None if any is not recorded or not readable here."""
    ids = baseline_image_ids(study)
    if any(i not in ids for i in range(n)):
        return None
    try:
        return [read_image(store, ids[i]) for i in range(n)]
    except Exception:  # noqa: BLE001 - missing or unreadable file (another machine's artifact directory)
        return None


def read_png(store, artifact_id: str) -> bytes:
    """One stored image's PNG bytes (raises OSError, or the store's not-found error)."""
    with store.open_reader(artifact_id) as f:
        return f.read()
