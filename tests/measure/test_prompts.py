"""optimize.measure.prompts (built-in, files, COCO schema through datasets); metrics are in tests/measure/test_metrics.py."""

from __future__ import annotations

import json

import pytest

from optimize.measure.prompts import PromptsError, load_prompts, prompts_hash


# --- built-in and files --------------------------------------------------------------------------
def test_builtin():
    prompts = load_prompts("builtin", 64)
    assert len(prompts) == 64 and len(set(prompts)) == 64
    assert all(isinstance(p, str) and p == p.strip() and p for p in prompts)
    assert load_prompts("builtin", 3) == prompts[:3]


def test_txt(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \na fox\n", encoding="utf-8")
    assert load_prompts(str(f), 3) == ["a cat", "a dog", "a fox"]
    assert load_prompts(str(f), 2) == ["a cat", "a dog"]


def test_json(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(["one", " two ", "", "three"]))
    assert load_prompts(str(f), 3) == ["one", "two", "three"]


@pytest.mark.parametrize("column", ["prompt", "caption"])
def test_csv(tmp_path, column):
    f = tmp_path / "p.csv"
    f.write_text(f'id,{column}\n1,a cat\n2,"a dog, sleeping"\n3,a fox\n', encoding="utf-8")
    assert load_prompts(str(f), 2) == ["a cat", "a dog, sleeping"]


def test_csv_prefers_prompt_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("caption,prompt\nfrom caption,from prompt\n")
    assert load_prompts(str(f), 1) == ["from prompt"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "", "no prompts"),
    ("blank.txt", "\n  \n\n", "no prompts"),
    ("empty.json", "", "cannot read prompts"),
    ("empty-list.json", "[]", "no prompts"),
    ("dict.json", '{"prompts": ["a"]}', "JSON list"),
    ("text.json", '"a cat"', "JSON list"),
    ("no-column.csv", "id,text\n1,a cat\n", "no 'prompt' or 'caption' column"),
    ("empty.csv", "", "no 'prompt' or 'caption' column"),
    ("prompts.yaml", "- a cat\n", r"\.txt, \.json or \.csv"),
])
def test_bad_files(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PromptsError, match=message):
        load_prompts(str(f), 1)


def test_missing_file(tmp_path):
    with pytest.raises(PromptsError, match="does not exist"):
        load_prompts(str(tmp_path / "nope.txt"), 1)


def test_too_few_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    with pytest.raises(PromptsError, match="has 2 prompts, fewer than --num-samples 3"):
        load_prompts(str(f), 3)
    with pytest.raises(PromptsError, match="fewer than"):
        load_prompts("builtin", 10_000)


@pytest.mark.parametrize("n", [0, -1])
def test_num_samples_at_least_one(n):
    with pytest.raises(PromptsError, match="at least 1"):
        load_prompts("builtin", n)


@pytest.mark.parametrize("name,content,where", [
    ("p.txt", "a cat\n\n  {long}  \n", "line 3"),  # the file's own line number, blank lines counted
    ("p.json", json.dumps(["a cat", "", "{long}"]), "item 3"),
    ("p.csv", "prompt\na cat\n{long}\n", "row 2"),
])
def test_prompt_longer_than_the_limit_is_refused_naming_where(tmp_path, name, content, where):
    """CLIP reads 77 tokens: a prompt of thousands of characters is a mistake, refused in one bounded line."""
    limit = 1000
    f = tmp_path / name
    f.write_text(content.replace("{long}", "y" * 5000))
    with pytest.raises(PromptsError) as e:
        load_prompts(str(f), 2)
    message = str(e.value)
    assert f"{str(f)!r} {where}: a prompt may have at most {limit} characters" in message
    assert "(5000 characters)" in message and len(message) < 300 and "\n" not in message
    assert load_prompts(str(f), 1) == ["a cat"]  # a prompt not used is not refused
    f.write_text(content.replace("{long}", "y" * limit))
    assert load_prompts(str(f), 2) == ["a cat", "y" * limit]  # the limit itself is fine


def test_shorten():
    from optimize.runtime.text import shorten

    assert shorten("a cat") == "a cat"
    assert shorten("a\n  cat") == "a cat"
    assert shorten("x" * 10_000_000, 20) == "x" * 20 + " ... (10000000 characters)"


def test_prompts_hash():
    assert prompts_hash(["a", "b"]) == prompts_hash(["a", "b"])
    assert prompts_hash(["a", "b"]) != prompts_hash(["b", "a"])
    assert len(prompts_hash(["a"])) == 16


# --- COCO schema through the real datasets loader ------------------------------------------------
def _coco_rows(n):
    return {
        "file_name": [f"{i:012d}.jpg" for i in range(n)],
        "coco_url": [f"http://images.cocodataset.org/val2017/{i:012d}.jpg" for i in range(n)],
        "height": [480] * n,
        "width": [640] * n,
        "date_captured": ["2013-11-14 17:02:52"] * n,
        "id": list(range(n)),
        "captions": [[f"first caption {i}", f"second caption {i}", f"third {i}"] for i in range(n)],
    }


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """datasets with no network and its cache in tmp_path (also if datasets was imported before)."""
    import datasets

    cache = tmp_path / "hf-cache"
    for var, value in [("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")),
                       ("HF_DATASETS_CACHE", str(cache))]:
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def test_coco_schema_dataset(tmp_path, offline_datasets):
    import datasets

    root = tmp_path / "coco2017"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(_coco_rows(5)).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    datasets.Dataset.from_dict(_coco_rows(2)).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))

    assert load_prompts(f"coco:{root}", 3) == ["first caption 0", "first caption 1", "first caption 2"]
    assert any(offline_datasets.iterdir()), "datasets did not use the temporary cache"
    with pytest.raises(PromptsError, match="has 5 prompts, fewer than"):
        load_prompts(f"coco:{root}", 6)


def test_coco_without_validation_split(tmp_path, offline_datasets):
    import datasets

    root = tmp_path / "coco-train-only"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(_coco_rows(3)).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(PromptsError, match="cannot load COCO captions"):
        load_prompts(f"coco:{root}", 1)


def test_coco_without_captions_column(tmp_path, offline_datasets):
    import datasets

    root = tmp_path / "not-coco"
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(PromptsError, match="no 'captions' column"):
        load_prompts(f"coco:{root}", 1)
