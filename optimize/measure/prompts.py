"""Prompts a study generates from: COCO-2017 validation captions, a file, or a built-in set.

``--prompts`` takes ``coco`` (``datasets.load_dataset("phiyodr/coco2017")``, validation split, first
caption of each image), ``coco:<dataset dir or hub id>`` (any dataset in COCO's schema), ``builtin``
(the captions in ``builtin_prompts.txt``, offline), ``testbed`` (the held-out captions of the trained
testbed pipeline, what ``builtin`` means for ``--pipe tiny``) or a file: ``.txt`` one prompt a line, ``.json`` a
list of strings, ``.csv`` with a ``prompt`` or ``caption`` column.

Example:
    >>> load_prompts("builtin", 3)
    ['A man riding a bicycle down a busy city street.', 'Two cats sleeping on a red couch next to a window.', 'A bowl of fresh fruit on a wooden kitchen table.']
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from ..runtime.text import shorten

COCO_DATASET = "phiyodr/coco2017"
_BUILTIN = os.path.join(os.path.dirname(__file__), "builtin_prompts.txt")
# CLIP reads 77 tokens, a few hundred characters: a longer prompt is a mistake (a file with no line
# breaks, say), and tokenising megabytes costs minutes per image.
MAX_PROMPT_CHARS = 1000
NAMED = ("coco", "builtin", "testbed")  # the sources that are not files
_UNITS = {".txt": "line", ".json": "item", ".csv": "row"}


class PromptsError(ValueError):
    """Prompts that cannot be read or are empty."""


def _is_named(spec: str) -> bool:
    """A source that is not a file: ``coco``, ``coco:<dataset>``, ``builtin``, ``testbed``."""
    return spec in NAMED or spec.startswith("coco:")


def check_spec(spec: str) -> None:
    """Cheap checks run before anything loads: the file exists and has a known format."""
    if _is_named(spec):
        return
    if not os.path.isfile(spec):
        raise PromptsError(f"prompts file {spec!r} does not exist (or use 'coco', 'coco:<dataset>' or 'builtin')")
    if not os.access(spec, os.R_OK):
        raise PromptsError(f"prompts file {spec!r} is not readable")
    if os.path.splitext(spec)[1].lower() not in _UNITS:
        raise PromptsError(f"prompts file {spec!r}: use a .txt, .json or .csv file")


def load_prompts(spec: str, num_samples: int) -> list[str]:
    """Return the first ``num_samples`` prompts of ``spec``; one longer than :data:`MAX_PROMPT_CHARS`
    is refused, naming where it is (``line 3``, ``item 3``, ``row 3``, ``caption 3``)."""
    if num_samples < 1:
        raise PromptsError("--num-samples must be at least 1")
    numbered, unit = _numbered(spec, num_samples)
    if not numbered:
        raise PromptsError(f"no prompts in {spec!r}")
    _check_lengths(spec, unit, numbered[:num_samples])  # first: a file with no line breaks is one huge prompt
    if len(numbered) < num_samples:
        raise PromptsError(f"{spec!r} has {counted(len(numbered), 'prompt')}, fewer than --num-samples {num_samples}")
    return [p for _, p in numbered[:num_samples]]


def _numbered(spec: str, count: int) -> tuple[list[tuple[int, str]], str]:
    """The prompts of ``spec`` (at least the first ``count`` of a COCO dataset), stripped, none empty,
    each with its place in the source (1-based), and what a place is called there."""
    check_spec(spec)
    if spec == "builtin":
        prompts, unit = _read_txt(_BUILTIN), "line"
    elif spec == "testbed":
        from ..runtime.testbed import captions

        prompts, unit = captions("heldout"), "caption"
    elif spec == "coco" or spec.startswith("coco:"):
        prompts, unit = _read_coco(spec.partition(":")[2] or COCO_DATASET, count), "caption"
    else:
        prompts, unit = _read_file(spec), _UNITS[os.path.splitext(spec)[1].lower()]
    return [(i, p.strip()) for i, p in enumerate(prompts, 1) if isinstance(p, str) and p.strip()], unit


def _check_lengths(spec: str, unit: str, numbered: list[tuple[int, str]]) -> None:
    for i, prompt in numbered:
        check_length(prompt, f"{spec!r} {unit} {i}")


def check_length(prompt: str, where: str) -> None:
    """Refuse a prompt longer than :data:`MAX_PROMPT_CHARS`, naming ``where`` it is."""
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptsError(f"{where}: a prompt may have at most {MAX_PROMPT_CHARS} characters (CLIP reads the first "
                           f"77 tokens), this one is {shorten(prompt, 40)!r}")


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``counted(1, "trial")`` is ``'1 trial'``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def load_heldout(spec: str, num_samples: int, n: int) -> list[str]:
    """``n`` prompts of ``spec`` that the search never sees: the ones after its first ``num_samples``
    (COCO: the next captions; a file: its next lines; builtin: the captions after the search's), with
    every repeat of a search prompt or of an earlier held-out one left out."""
    if n < 1:
        raise PromptsError("--validate needs at least 1 held-out prompt")
    numbered, unit = _numbered(spec, num_samples + 2 * n)  # a margin for repeats left out
    search = {p for _, p in numbered[:num_samples]}
    seen = set(search)
    heldout: list[tuple[int, str]] = []
    for i, p in numbered[num_samples:]:
        if p not in seen:
            seen.add(p)
            heldout.append((i, p))
        if len(heldout) == n:
            _check_lengths(spec, unit, heldout)
            return [p for _, p in heldout]
    raise PromptsError(
        f"{spec!r} has {len(search) + len(heldout)} distinct prompts: --num-samples {num_samples} for the search "
        f"and --validate {n} held out need {num_samples + n}; add prompts, lower --validate, or --validate 0")


def prompt_source(spec: str) -> str:
    """``spec`` as a study stores it, to find the same prompts later: a file by its absolute path."""
    return spec if _is_named(spec) else os.path.abspath(spec)


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _read_txt(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:  # -sig: files saved by Excel/Notepad start with a BOM
        return f.read().splitlines()


def _read_file(path: str) -> list[str]:
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            return _read_txt(path)
        if ext == ".json":
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
            if not isinstance(data, list):
                raise PromptsError(f"{path}: expected a JSON list of strings")
            return data
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            column = next((c for c in ("prompt", "caption") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise PromptsError(f"{path}: no 'prompt' or 'caption' column")
            return [row[column] for row in reader]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, PromptsError):
            raise
        raise PromptsError(f"cannot read prompts from {path}: {e}") from None


def _read_coco(source: str, num_samples: int) -> list[str]:
    """First caption of the first ``num_samples`` validation images of a COCO-schema dataset."""
    if not os.path.isdir(source):
        _check_hub_dataset(source)  # before datasets, slow to import, loads
    import datasets

    try:
        split = datasets.load_dataset(source, split="validation")
    except Exception as e:  # noqa: BLE001 - no network, missing dataset: one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptsError(
            f"cannot load COCO captions from {source!r} ({first}); offline, use --prompts builtin or a file"
        ) from e
    column = "captions" if "captions" in split.column_names else "caption" if "caption" in split.column_names else None
    if column is None:
        raise PromptsError(f"{source}: validation split has no 'captions' column")
    rows = split.select(range(min(num_samples, len(split))))[column]
    return [row[0] if isinstance(row, list) and row else row for row in rows]


def _check_hub_dataset(source: str) -> None:
    """Without network, datasets retries for about 40 s (eleven lines) before it gives up: one quick
    request to the hub first, and one line if it cannot give the dataset."""
    from ..runtime import hub

    flag = os.environ.get("HF_DATASETS_OFFLINE")  # as datasets reads it: its own variable, else the hub's
    if (flag.upper() in ("1", "ON", "YES", "TRUE") if flag is not None else hub.offline()):
        return
    reason = hub.unavailable(source, "dataset")
    if reason is None:
        return
    cached = (" (it is in the local cache: HF_HUB_OFFLINE=1 reads it from there)"
              if hub.cached(source, "dataset") is not None else "")
    raise PromptsError(f"cannot load COCO captions from {source!r}: {reason}{cached}; "
                       "with no network, use --prompts builtin or a prompts file")
