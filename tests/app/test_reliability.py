"""Bad input and faults: one clear line, a non-zero exit, nothing lost. One test (or more) per row of
the table in docs/reliability.md, in the same order.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import sqlite3
import subprocess
import weakref

import optuna
import pytest
from optuna.trial import TrialState

from helpers import ERROR_PREFIX, load_study, one_error_line, run_args, run_cli, storage_url

from optimize.app import runner
from optimize.measure import prompts
from optimize.study import storage
from optimize.study.record import STUDY_ATTR


def _run(tmp_path, monkeypatch, *extra, url=None):
    monkeypatch.chdir(tmp_path)
    args = run_args(tmp_path, *extra)
    if url is not None:
        args[args.index("--storage") + 1] = url
    return run_cli(args)


# --- storage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://localhost/0", "studies.db", "mongodb://x/y"])
@pytest.mark.parametrize("workers", [1, 2])
def test_unknown_storage_scheme(url, workers, tmp_path, monkeypatch, no_model):
    line = one_error_line(*_run(tmp_path, monkeypatch, "--workers", workers, url=url))
    assert f"unsupported storage {url!r}: use sqlite:///PATH, postgresql://... or mysql://..." in line


@pytest.mark.parametrize("workers", [1, 2])
def test_unreachable_postgresql(workers, tmp_path, monkeypatch, no_model):
    """Nothing listens on port 1: refused at once, the password is not shown, no worker starts."""
    pytest.importorskip("psycopg2")
    url = "postgresql://optimize:s3cret@127.0.0.1:1/studies"
    line = one_error_line(*_run(tmp_path, monkeypatch, "--workers", workers, url=url))
    assert "cannot open storage postgresql://optimize:***@127.0.0.1:1/studies" in line
    assert "Connection refused" in line and "is the PostgreSQL server running" in line
    assert "s3cret" not in line


def test_silent_postgresql_server_times_out(tmp_path, monkeypatch, no_model):
    """A host that accepts the connection but never answers: given up after CONNECT_TIMEOUT seconds."""
    import socket
    import time

    pytest.importorskip("psycopg2")
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT", 2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nobody ever speaks
        port = silent.getsockname()[1]
        start = time.monotonic()
        line = one_error_line(*_run(tmp_path, monkeypatch, url=f"postgresql://u@127.0.0.1:{port}/db"))
        elapsed = time.monotonic() - start
    assert f"cannot open storage postgresql://u@127.0.0.1:{port}/db" in line and "timeout expired" in line, line
    assert 1.5 < elapsed < 20


def test_postgresql_without_driver(tmp_path, monkeypatch, no_model):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("psycopg", "psycopg2") else real(name, *a))
    line = one_error_line(*_run(tmp_path, monkeypatch, url="postgresql://u@127.0.0.1:1/db"))
    assert "PostgreSQL storage needs a driver: pip install psycopg2-binary" in line


def test_locked_sqlite_file(tmp_path, monkeypatch, no_model):
    """Another process holds an exclusive lock: the run waits ``?timeout=`` seconds (default 60), then
    says so; the database is intact once the lock goes."""
    db = tmp_path / "s.db"
    storage.open_storage(f"sqlite:///{db}")
    con = sqlite3.connect(str(db), isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")
        line = one_error_line(*_run(tmp_path, monkeypatch, url=f"sqlite:///{db}?timeout=1"))
    finally:
        con.execute("ROLLBACK")
        con.close()
    assert "database is locked" in line and "another process holds a lock on the file" in line
    storage.open_storage(f"sqlite:///{db}")  # still a good database


def _command(command, url, tmp_path, monkeypatch):
    """``run`` (small, into ``tmp_path``) or a reader (best, report, generate, dashboard) on ``url``."""
    if command.startswith("run"):
        return _run(tmp_path, monkeypatch, *command.split()[1:], url=url)
    monkeypatch.chdir(tmp_path)
    return run_cli([command, "--storage", url, *READERS[command]])


@pytest.mark.parametrize("command", ["run", "best", "report"])
def test_corrupt_sqlite_file(command, tmp_path, monkeypatch, no_model):
    """The readers name the cause as run does, not the "exception ... during the commit" Optuna's
    read-only open wraps it in."""
    db = tmp_path / "s.db"
    junk = b"these are not the tables you are looking for\n" * 100
    db.write_bytes(junk)
    line = one_error_line(*_command(command, f"sqlite:///{db}", tmp_path, monkeypatch))
    assert "file is not a database" in line and "left untouched" in line, line
    assert "during the commit" not in line
    assert db.read_bytes() == junk


@pytest.mark.parametrize("command", ["best", "report"])
def test_readers_name_an_unreachable_postgresql_server(command, tmp_path, monkeypatch, no_model):
    pytest.importorskip("psycopg2")
    line = one_error_line(*_command(command, "postgresql://u@127.0.0.1:1/db", tmp_path, monkeypatch))
    assert "cannot open storage postgresql://u@127.0.0.1:1/db" in line and "Connection refused" in line, line
    assert "during the commit" not in line


PASSWORD = "secretpw"


@pytest.mark.parametrize("url,needle", [
    (f"postgresql://u:{PASSWORD}@127.0.0.1:abc/studies", "malformed storage URL 'postgresql://u:***@127.0.0.1:abc/studies'"),
    (f"postgresql://u:{PASSWORD}@127.0.0.1:abc/studies?x=a@b", "malformed storage URL 'postgresql://u:***@b'"),
    (f"redis://u:{PASSWORD}@127.0.0.1/0", "unsupported storage 'redis://u:***@127.0.0.1/0'"),
])
@pytest.mark.parametrize("command", ["run", "run --workers 2", "best", "report", "generate", "dashboard"])
def test_password_is_never_shown(url, needle, command, tmp_path, monkeypatch, no_model):
    """Also in a URL SQLAlchemy cannot parse (a port that is not a number): everything between the user
    and the last ``@`` is hidden."""
    if command.startswith("run"):
        code, out, err = _run(tmp_path, monkeypatch, *command.split()[1:], url=url)
    else:
        monkeypatch.chdir(tmp_path)
        code, out, err = run_cli([command, "--storage", url, *(["a cat"] if command == "generate" else [])])
    line = one_error_line(code, out, err)
    assert needle in line, line
    assert PASSWORD not in out + err
    assert storage.redact(url).count("***") == 1 and PASSWORD not in storage.redact(url)


# A password with an unescaped "@" and ":" in it, in the query string, or behind a mistyped scheme: no
# part of it may show (SQLAlchemy ends a password at its first "@" and takes the rest for the host, which
# the driver's error then names).
PIECES = ("alpha", "bravo", "charlie")


@pytest.mark.parametrize("url,needle", [
    ("postgresql://u@127.0.0.1:1/studies?password=alphabravocharlie",
     "cannot open storage postgresql://u@127.0.0.1:1/studies?password=***: connection to server at \"127.0.0.1\""),
    ("postgresql:/u:alphabravocharlie@127.0.0.1:1/studies", "unsupported storage 'postgresql:/u:***@127.0.0.1:1/studies'"),
    ("postgresql://u:alpha@bravo:charlie@127.0.0.1:1/studies",
     "cannot open storage postgresql://u:***@127.0.0.1:1/studies: connection to server at \"127.0.0.1\""),
    ("postgresql://u:alpha:bravo@charlie@127.0.0.1:1/studies?sslpassword=alpha",
     "cannot open storage postgresql://u:***@127.0.0.1:1/studies?sslpassword=***: connection to server"),
])
@pytest.mark.parametrize("command", ["run", "run --workers 2", "best", "report", "generate", "dashboard"])
def test_password_written_any_way_is_never_shown(url, needle, command, tmp_path, monkeypatch, no_model):
    pytest.importorskip("psycopg2")
    line = one_error_line(*_command(command, url, tmp_path, monkeypatch))
    assert needle in line, line
    assert not any(piece in line for piece in PIECES), line
    assert not any(piece in storage.redact(url) for piece in PIECES)


def test_driver_errors_are_scrubbed_of_the_password():
    """A driver's words may quote the URL, a DSN or the host part a mistyped password became."""
    url = "postgresql://u:alpha@bravo@db/studies"
    text = ('could not translate host name "bravo@db" to address; dsn "host=db password=alpha@bravo"; '
            "url postgresql://u:alpha@bravo@db/studies")
    scrubbed = storage.scrub(text, url)
    assert not any(piece in scrubbed for piece in PIECES), scrubbed
    assert storage.first_line(RuntimeError(text), url) == scrubbed


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://", "sqlite:///file::memory:?uri=true"])
@pytest.mark.parametrize("command", ["run", "run --workers 2", "best"])
def test_in_memory_sqlite_is_refused(url, command, tmp_path, monkeypatch, no_model):
    """A study must outlive the process that made it."""
    if command.startswith("run"):
        code, out, err = _run(tmp_path, monkeypatch, *command.split()[1:], url=url)
    else:
        code, out, err = run_cli([command, "--storage", url])
    line = one_error_line(code, out, err)
    assert f"{url!r} is an in-memory database, gone when the process ends: a study must outlive it" in line
    assert not (tmp_path / "s.db").exists()


READERS = {"best": [], "report": ["-o", "r.html"], "generate": ["a cat", "-o", "c.png"], "dashboard": []}


@pytest.mark.parametrize("command", list(READERS))
def test_read_only_commands_create_nothing(command, tmp_path, monkeypatch, no_model):
    """best, report, generate and dashboard open the storage read-only: a typo in the path is "no
    study", with no file or directory made; an empty database file is left as it is."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli([command, "--storage", "sqlite:///typo/dir/x.db", *READERS[command]]))
    assert "no study database at typo/dir/x.db" in line
    assert os.listdir(tmp_path) == []
    (tmp_path / "empty.db").write_bytes(b"")
    line = one_error_line(*run_cli([command, "--storage", "sqlite:///empty.db", *READERS[command]]))
    assert "no study in sqlite:///empty.db: it holds no Optuna tables (left untouched)" in line
    assert sorted(os.listdir(tmp_path)) == ["empty.db"] and (tmp_path / "empty.db").read_bytes() == b""


def test_best_reads_a_study_without_writing_it(tmp_path, monkeypatch, no_model):
    """A study's database is read, never written: byte for byte the same afterwards."""
    _stored_study(tmp_path, "shared", ["--max-loss", "0.05"])
    db = tmp_path / "s.db"
    before = db.read_bytes()
    code, out, err = run_cli(["best", "--storage", storage_url(tmp_path), "--study", "shared"])
    assert code == 1 and "shared: no feasible trial yet" in out, out + err  # the study has no trial
    assert db.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["s.db"]


# --- a study of the same name made for something else --------------------------------------------------


def _stored_study(tmp_path, name: str, extra: list[str]) -> optuna.Study:
    """A study as ``run ... --study NAME EXTRA`` leaves it, without running a model."""
    from dataclasses import asdict

    from optimize.study.baseline import Baseline
    from optimize.app.cli import check_run_options, run

    params = run.make_context("run", run_args(tmp_path, "--study", name, *extra)[1:]).params
    spec, opts = check_run_options(params)
    fingerprint = runner.fingerprint_for(spec, opts, prompts.load_prompts(opts.prompt_spec, opts.num_samples)).as_dict()
    study = optuna.create_study(storage=storage_url(tmp_path), study_name=name, direction=opts.goal.direction)
    study.set_user_attr(STUDY_ATTR, {"goal": opts.goal.as_dict(), "constraints": opts.goal.constraint_names,
                                            "fingerprint": fingerprint})
    study.set_user_attr("baseline", asdict(Baseline(0.1, 0.02, 30.0, [30.0, 30.0], fingerprint, 32, 32)))
    return study


@pytest.mark.parametrize("change,needles", [
    (["--target-speedup", "1.5"], ["exists with goal", "'mode': 'max'", "'mode': 'target'", "use another --study"]),
    (["--max-loss", "0.03"], ["exists with goal", "'max_loss': 0.05", "'max_loss': 0.03"]),
    (["--max-loss", "0.05", "--pipe", "tiny-xl"], ["baseline was measured with other settings", "pipe='tiny'",
                                                   "(now 'tiny-xl')", "use the same settings or another --study"]),
    (["--max-loss", "0.05", "--scheduler", "euler"], ["scheduler='ddim' (now 'euler')"]),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_study_exists_with_another_mode_or_model(change, needles, workers, tmp_path, monkeypatch, no_model):
    _stored_study(tmp_path, "shared", ["--max-loss", "0.05"])
    before = load_study(storage_url(tmp_path), "shared").user_attrs
    line = one_error_line(*_run(tmp_path, monkeypatch, "--study", "shared", "--workers", workers, *change))
    for needle in needles:
        assert needle in line, line
    assert load_study(storage_url(tmp_path), "shared").user_attrs == before


@pytest.mark.parametrize("name", ["", "  "])
@pytest.mark.parametrize("workers", [1, 2])
def test_empty_study_name_is_refused(name, workers, tmp_path, monkeypatch, no_model):
    line = one_error_line(*_run(tmp_path, monkeypatch, "--study", name, "--workers", workers))
    assert "--study must not be empty (leave it out for the name derived from model, scheduler, steps and goal)" in line
    assert not (tmp_path / "s.db").exists()


# --- prompts and samples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("content,needle", [
    (b"", "no prompts in"),
    (b"\n  \n\t\n", "no prompts in"),
    ("caf\xe9\n".encode("latin-1"), "cannot read prompts from"),
])
def test_prompts_file_empty_or_undecodable(content, needle, tmp_path, monkeypatch, no_model):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    line = one_error_line(*_run(tmp_path, monkeypatch, "--prompts", path))
    assert needle in line and "prompts.txt" in line
    assert not (tmp_path / "s.db").exists() or not optuna.get_all_study_names(storage.open_storage(storage_url(tmp_path)))


def test_prompts_file_unreadable(tmp_path, monkeypatch, no_model):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\na dog\n")
    if os.geteuid() == 0:  # root reads any file: make the read itself fail as a permission problem does
        def denied(file, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))

        monkeypatch.setattr(prompts, "open", denied, raising=False)
        needle = "Permission denied"
    else:
        os.chmod(path, 0)
        needle = "is not readable"
    line = one_error_line(*_run(tmp_path, monkeypatch, "--prompts", path))
    assert needle in line and "prompts.txt" in line


@pytest.mark.parametrize("workers", [1, 2])
def test_num_samples_zero(workers, tmp_path, monkeypatch, no_model):
    line = one_error_line(*_run(tmp_path, monkeypatch, "--num-samples", "0", "--workers", workers))
    assert "--num-samples must be at least 1" in line
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_prompt_too_long_is_refused_naming_its_line(workers, tmp_path, monkeypatch, no_model):
    """A prompts file with one 10 MB line (no line breaks where there should be some): refused in one
    line of bounded length that names the line, before anything is stored."""
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n\n" + "x" * 10_000_000 + "\na fox\n")
    line = one_error_line(*_run(tmp_path, monkeypatch, "--prompts", path, "--num-samples", "3", "--workers", workers))
    assert f"{str(path)!r} line 3: a prompt may have at most 1000 characters (CLIP reads the first 77 tokens)" in line
    assert "(10000000 characters)" in line and len(line) < 400
    assert not (tmp_path / "s.db").exists()


def test_generate_refuses_a_prompt_too_long(tmp_path, monkeypatch, no_model):
    params = tmp_path / "sp.json"
    params.write_text(json.dumps({"k": {"pipe": "tiny", "scheduler": "ddim", "steps": 8, "dtype": "fp32", "params": {}}}))
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*run_cli(["generate", "--params", params, "a cat", "x" * 5000, "-o", "c.png"]))
    assert "prompt 2: a prompt may have at most 1000 characters" in line and "(5000 characters)" in line
    assert len(line) < 300 and sorted(os.listdir(tmp_path)) == ["sp.json"]


# --- the baseline a run shows ---------------------------------------------------------------------------------

STALE = 99.0  # seconds per image: a stored baseline time no run on this machine measures


@pytest.mark.slow  # two tiny runs
@pytest.mark.parametrize("case", ["resumed", "another worker stored its baseline first"])
def test_the_baseline_shown_is_the_one_the_speedups_divide_by(case, tmp_path, monkeypatch):
    """A resumed run, or a worker whose baseline lost the race, never divides by the stored time
    (measured earlier, or by the other worker): each trial divides by the baseline calls paired with it
    here, and the baseline line says so, the stored time beside it as stored."""
    import re

    from optimize.study.baseline import Baseline
    from optimize.study.record import BASELINE_TIME, ROUNDS

    argv = ["--n-trials", "1", "--no-warm-start", "--validate", "0"]
    if case == "resumed":
        assert _run(tmp_path, monkeypatch, *argv)[0] == 0
        study = load_study(storage_url(tmp_path))
        stored = dict(study.user_attrs["baseline"], time_per_image=STALE)
        study.set_user_attr("baseline", stored)
    else:
        real = Baseline.insert_once

        def the_other_first(self, storage_, study):
            real(Baseline(**{**self.__dict__, "time_per_image": STALE}), storage_, study)
            return False

        monkeypatch.setattr(Baseline, "insert_once", the_other_first)
    code, out, err = _run(tmp_path, monkeypatch, *argv)
    assert code == 0, err
    trial = load_study(storage_url(tmp_path)).trials[-1]
    assert not re.findall(r"^baseline \(eager\): [\d.]+ ms/image", out, re.M), out  # no time it does not use
    assert "each trial's speedup is against the baseline calls timed beside it on this device" in out
    assert f"(stored time: {1000 * STALE:.1f} ms/image)" in out
    assert trial.user_attrs[ROUNDS] >= 1 and trial.user_attrs[BASELINE_TIME] < STALE / 10  # its own paired calls
    if case != "resumed":
        assert "another worker stored the baseline first" in out


# --- a pipeline that cannot load ----------------------------------------------------------------------------


def _pipeline_dir(tmp_path, components: bool) -> str:
    """A directory that looks like a saved SD pipeline, but for the weights (or, without ``components``,
    everything but model_index.json)."""
    pipe = tmp_path / "my-finetune"
    pipe.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0", "feature_extractor": [None, None],
             "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (pipe / "model_index.json").write_text(json.dumps(index))
    if components:
        for name, config in [("scheduler", "scheduler_config.json"), ("tokenizer", "tokenizer_config.json"),
                             ("text_encoder", "config.json"), ("unet", "config.json"), ("vae", "config.json")]:
            (pipe / name).mkdir()
            (pipe / name / config).write_text("{}")
    return str(pipe)


@pytest.mark.parametrize("components,needle", [
    (True, "missing text_encoder/ weights (*.safetensors or *.bin), unet/ weights (*.safetensors or *.bin), vae/ weights"),
    (False, "missing scheduler/, text_encoder/, tokenizer/, unet/, vae/;"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_pipeline_that_cannot_load_leaves_no_study(components, needle, workers, tmp_path, monkeypatch, no_model):
    """Found before the storage is opened: no study, settings or warm-start trials stored, no worker
    started. (Its safety checker is not needed: it is never loaded.)"""
    pipe = _pipeline_dir(tmp_path, components)
    line = one_error_line(*_run(tmp_path, monkeypatch, "--pipe", pipe, "--workers", workers))
    assert f"could not load pipeline {pipe}: {needle}" in line, line
    assert "save the whole pipeline there (save_pretrained)" in line
    assert not (tmp_path / "s.db").exists()


def _as_a_newcomer(tmp_path, *argv) -> tuple[int, str, float]:
    """``optimize-sd run ARGV`` in a fresh process as a newcomer runs it: none of the offline variables
    these tests set, a hub that refuses every connection (no network); (exit code, stderr, seconds)."""
    import sys
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "optimize.cli", "run", "--no-progress", "--storage",
                           storage_url(tmp_path), "--output", str(tmp_path / "p.json"), *argv],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr, time.monotonic() - start


@pytest.mark.slow  # a fresh interpreter per case: imports alone take seconds on a small machine
@pytest.mark.parametrize("argv,needle", [
    (["--pipe", "./missing-dir"], "--pipe ./missing-dir: no such directory"),
    (["--pipe", "missing/dir/"], "--pipe missing/dir/: no such directory"),
    (["--pipe", "no-such-org/no-such-model"],
     "could not load pipeline no-such-org/no-such-model: no-such-org/no-such-model is not in the local Hugging Face "
     "cache and the hub at http://127.0.0.1:9 cannot be reached"),
    (["--pipe", "tiny", "--prompts", "coco"],
     "cannot load COCO captions from 'phiyodr/coco2017': the hub at http://127.0.0.1:9 cannot be reached"),
])
def test_without_network_a_bad_pipe_or_coco_fails_fast_and_leaves_no_study(argv, needle, tmp_path):
    """The pipe is checked first and named (a path is never taken for a hub id); COCO without network is
    one line pointing to the offline prompts, not a minute of datasets' retries; no database is made."""
    code, err, seconds = _as_a_newcomer(tmp_path, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith(ERROR_PREFIX), err
    assert needle in err, err
    if "coco" in argv:
        assert "use --prompts builtin or a prompts file" in err
    # no retries (datasets logs each one); the bound only catches minutes of them (diffusers' own), with room
    # for a loaded machine's imports (30 s was seen at load 5)
    assert "Retrying" not in err and seconds < 90, seconds
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "studies").exists()


# --- disk full while writing search_params.json -------------------------------------------------------------

OLD = {"some:other:key": {"params": {}, "speedup": 1.0}}


def _tmpfs(directory, size: str):
    """A tmpfs of ``size`` mounted on ``directory`` until the test ends (needs root and mount rights;
    the test is skipped elsewhere)."""
    directory.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (where it cannot be mounted, the simulated case runs)."""
    yield from _tmpfs(tmp_path / "full", "64k")


def _fill(directory) -> None:
    """Fill the file system of ``directory`` to the last byte."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _check_disk_full(tmp_path, out_path, old_bytes, result, disk):
    code, out, err = result
    assert code == 1, out + err
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1, err
    # the disk is named, in the error line and in every warning before it
    assert re.search(rf"{re.escape(str(out_path))} not updated: No space left on device \(the disk mounted at "
                     rf"{re.escape(disk)} has [\d.]+ [KMG]?i?B free\); the old file is intact", lines[0]), lines[0]
    warnings = [line for line in err.splitlines() if "warning: " in line]
    assert warnings and all(f"not updated: No space left on device (the disk mounted at {disk} has " in w
                            for w in warnings), warnings
    assert "optimize-sd best --study tiny-ddim-8steps-max-loss0.5" in lines[0]
    assert "warning: " in err and "Traceback" not in out + err
    assert out_path.read_bytes() == old_bytes  # the old file, whole
    assert not glob.glob(str(out_path.parent / ".search_params.*.tmp"))
    study = load_study(storage_url(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2  # every trial kept in the study


def test_disk_full_real(tmp_path, tiny_fs, monkeypatch):
    """(A loss bound of 0.5 makes every trial feasible, so every trial tries to save.)"""
    out_path = tiny_fs / "search_params.json"
    out_path.write_text(json.dumps(OLD))
    old_bytes = out_path.read_bytes()
    _fill(tiny_fs)
    monkeypatch.chdir(tmp_path)
    args = run_args(tmp_path, "--max-loss", "0.5", "--n-trials", "2")
    args[args.index("--output") + 1] = str(out_path)
    _check_disk_full(tmp_path, out_path, old_bytes, run_cli(args), str(tiny_fs))


def _enospc_writes(monkeypatch, only_during_trials: bool = False):
    """Writes of search_params.json fail half-way with ENOSPC: all of them, or only those made as a
    trial ends (the run's last try, after the trials, then succeeds)."""
    import inspect

    calls = []
    real_dump = storage.json.dump

    def dump(data, f, **kwargs):
        during_trial = any(frame.function == "after_trial" for frame in inspect.stack())
        calls.append(during_trial)
        if during_trial or not only_during_trials:
            f.write('{"half": ')
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dump(data, f, **kwargs)

    monkeypatch.setattr(storage.json, "dump", dump)
    return calls


def test_disk_full_simulated(tmp_path, monkeypatch):
    out_path = tmp_path / "search_params.json"
    out_path.write_text(json.dumps(OLD))
    old_bytes = out_path.read_bytes()
    _enospc_writes(monkeypatch)
    _check_disk_full(tmp_path, out_path, old_bytes, _run(tmp_path, monkeypatch, "--max-loss", "0.5", "--n-trials", "2"),
                     _mount_point(tmp_path))


def test_disk_full_then_space_again(tmp_path, monkeypatch):
    """The writes during the run fail; the last try, at the end, succeeds: exit 0, the best is saved."""
    from optimize.study.record import Goal, best_feasible

    out_path = tmp_path / "search_params.json"
    out_path.write_text(json.dumps(OLD))
    calls = _enospc_writes(monkeypatch, only_during_trials=True)
    code, out, err = _run(tmp_path, monkeypatch, "--max-loss", "0.5", "--n-trials", "2")
    assert code == 0, out + err
    assert calls[-1] is False and all(calls[:-1]) and err.count("No space left on device") == len(calls) - 1 >= 1
    data = json.loads(out_path.read_text())
    best = best_feasible(load_study(storage_url(tmp_path)), Goal("max", None, 0.5))
    assert data["some:other:key"] == OLD["some:other:key"] and data["tiny:ddim:8:max:0.5"]["trial"] == best.number


def _mount_point(path) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: room for a study of the tiny pipeline and its images (skipped where it cannot be
    mounted)."""
    yield from _tmpfs(tmp_path / "small", "1m")


@pytest.mark.slow  # two tiny runs
def test_disk_full_during_a_run_real(small_fs, monkeypatch):
    """Study, images and search_params.json on one disk, which fills up during the second trial: one line
    that names the disk (SQLite's own words, "database or disk is full", named neither), exit 1; the
    study intact with its completed trial and the running one left to be retried, search_params.json
    whole. With space again, the same command goes on and retries that trial."""
    from optimize import search

    out_path = small_fs / "search_params.json"
    out_path.write_text(json.dumps(OLD))
    real_call, calls = search.Objective.__call__, []

    def fills_the_disk(self, trial):
        calls.append(trial.number)
        if len(calls) == 2:
            _fill(small_fs)
        return real_call(self, trial)

    monkeypatch.setattr(search.Objective, "__call__", fills_the_disk)
    monkeypatch.chdir(small_fs)
    args = run_args(small_fs, "--max-loss", "0.5", "--n-trials", "3", "--heartbeat", "1")
    line = one_error_line(*run_cli(args), exit_code=1)
    assert re.fullmatch(rf"optimize-sd: error: storage {re.escape(storage_url(small_fs))} failed: database or disk is "
                        rf"full \(the disk mounted at {re.escape(str(small_fs))} has [\d.]+ [KMG]?i?B free\); completed "
                        "trials are kept and a running trial is retried when the study next runs", line), line
    with sqlite3.connect(f"file:{small_fs / 's.db'}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    study = load_study(storage_url(small_fs))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert json.loads(out_path.read_text())["some:other:key"] == OLD["some:other:key"]
    assert not glob.glob(str(small_fs / ".*.tmp")) and not glob.glob(str(small_fs / "s-artifacts" / ".*.tmp"))

    os.remove(small_fs / "filler")
    code, out, err = run_cli(args)
    assert code == 0, out + err
    trials = load_study(storage_url(small_fs)).trials
    assert trials[1].state == TrialState.FAIL and TrialState.RUNNING not in [t.state for t in trials]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    # trial 1 was the second warm start: the disk filled before it stored its params
    assert retry.state == TrialState.COMPLETE and retry.params == trials[1].system_attrs["fixed_params"]
    assert "tiny:ddim:8:max:0.5" in json.loads(out_path.read_text())


def test_a_full_disk_leaves_no_half_written_image(tiny_fs):
    """Optuna's store wrote an image straight into its file: on a full disk an empty file stayed behind,
    named by no artifact. Now nothing is left, and the error names the file and the disk."""
    from PIL import Image

    from optimize.study.artifacts import artifact_store, upload_images

    study = optuna.create_study(storage=storage_url(tiny_fs.parent))
    store = artifact_store(str(tiny_fs / "images"))
    _fill(tiny_fs)
    with pytest.raises(OSError) as e:
        upload_images([Image.new("RGB", (64, 64), (200, 30, 30))], study, store, "baseline")
    assert os.listdir(tiny_fs / "images") == []
    assert f"No space left on device (the disk mounted at {tiny_fs} has 0 B free)" in str(e.value)


@pytest.mark.parametrize("command", ["report", "generate"])
def test_report_or_generate_onto_a_full_disk_names_the_file_and_the_disk(command, tmp_path, tiny_fs, monkeypatch):
    """It was "[Errno 28] No space left on device", naming neither."""
    from helpers import synthetic_study
    from optimize.study.files import atomic_write
    from optimize.study.record import Goal

    monkeypatch.chdir(tmp_path)
    synthetic_study(storage_url(tmp_path), "s", Goal("max", None, 0.5), [])
    out = tiny_fs / ("r.html" if command == "report" else "x.png")
    if command == "generate":  # its image written as generate writes it, without a model
        monkeypatch.setattr("optimize.app.cli.plan_from_study", lambda *a, **k: None)
        monkeypatch.setattr("optimize.app.cli.generate",
                            lambda plan, prompts, output, **k: iter([atomic_write(output, b"png")]))
    _fill(tiny_fs)
    words = ["a cat"] if command == "generate" else []
    line = one_error_line(*run_cli([command, *words, "--storage", storage_url(tmp_path), "-o", out]))
    assert line.endswith(f"cannot write {out}: No space left on device (the disk mounted at {tiny_fs} has 0 B free)"), line
    assert sorted(os.listdir(tiny_fs)) == ["filler"]


def test_the_storage_names_the_disk_sqlite_found_full(tmp_path):
    """SQLite says "database or disk is full": the line adds which disk, and how much is left on it."""
    import sqlalchemy.exc

    url = storage_url(tmp_path)
    e = sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))
    line = storage.first_line(e, url)
    assert re.fullmatch(rf"database or disk is full \(the disk mounted at {re.escape(_mount_point(tmp_path))} has "
                        r"[\d.]+ [KMG]?i?B free\)", line), line
    assert storage.first_line(e, "postgresql://u@h/db") == "database or disk is full"  # the server's disk: not ours


# --- search_params.json: written at the end of every run, refused up front where it cannot be -------------


@pytest.fixture
def read_only():
    """``read_only(path)`` makes a file or directory unwritable for this process: by its mode for a user,
    by the immutable attribute for root (whom modes do not stop); skipped where neither works."""
    frozen = []

    def make(path) -> None:
        if os.geteuid() != 0:
            os.chmod(path, 0o555 if os.path.isdir(path) else 0o444)
        else:
            done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make {path} immutable here: {done.stderr.decode().strip()}")
            frozen.append(path)
        assert not os.access(path, os.W_OK)

    yield make
    for path in frozen:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("what", ["file", "directory"])
@pytest.mark.parametrize("workers", [1, 2])
def test_unwritable_output_is_refused_before_anything_loads(what, workers, tmp_path, monkeypatch, read_only, no_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    if what == "file":
        output = locked / "search_params.json"
        output.write_text(json.dumps(OLD))
        read_only(output)
        needle = f"{output} is read-only: make it writable or pass another --output"
    else:
        read_only(locked)
        output = locked / "new" / "search_params.json"  # its directory would be made on the first write
        needle = f"cannot write {output}: directory {locked} is not writable; pass another --output"
    line = one_error_line(*_run(tmp_path, monkeypatch, "--workers", workers, "--output", output))
    assert needle in line, line
    assert not (tmp_path / "s.db").exists()
    assert sorted(os.listdir(locked)) == (["search_params.json"] if what == "file" else [])
    if what == "file":
        assert json.loads(output.read_text()) == OLD


def _study_with_a_best(tmp_path) -> int:
    """A study as earlier runs of ``run --max-loss 0.05`` left it (baseline, two feasible trials), made
    without a model; the number of its best trial."""
    from optimize.app.cli import check_run_options, run
    from optimize.levers import Config, DeepCache

    try:
        from helpers import synthetic_study
    except ImportError:
        from tests.helpers import synthetic_study
    params = run.make_context("run", run_args(tmp_path, "--max-loss", "0.05")[1:]).params
    spec, opts = check_run_options(params)
    fingerprint = runner.fingerprint_for(spec, opts, prompts.load_prompts(opts.prompt_spec, opts.num_samples))
    trials = [(Config(deepcache=DeepCache(3, 0)), 1.5, 0.01), (Config(deepcache=DeepCache(5, 0)), 1.8, 0.02)]
    synthetic_study(storage_url(tmp_path), runner.study_name_for(spec, opts), opts.goal, trials,
                    fingerprint=fingerprint.as_dict())
    return 1


@pytest.mark.parametrize("case", ["file moved away", "new --output", "file holds an older best", "disk full"])
def test_best_is_saved_at_the_end_of_every_run(case, tmp_path, monkeypatch):
    """No trial of this run becomes the best (its one trial fails): the study's best is written all the
    same, and "saved" is printed only once it was. A failed write is one line and exit 1, the study kept."""
    from optimize.search import objective as search

    best = _study_with_a_best(tmp_path)
    key = "tiny:ddim:8:max:0.05"
    output = tmp_path / ("new/dir/sp.json" if case == "new --output" else "search_params.json")
    if case == "file holds an older best":
        output.write_text(json.dumps({key: {"trial": 0, "params": {}}, **OLD}))
    if case == "disk full":
        output.write_text(json.dumps(OLD))
        _enospc_writes(monkeypatch)

    def fails(self, trial):
        raise RuntimeError("made to fail")

    monkeypatch.setattr(search.Objective, "__call__", fails)
    code, out, err = _run(tmp_path, monkeypatch, "--max-loss", "0.05", "--n-trials", "1", "--output", output)
    study = load_study(storage_url(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    if case == "disk full":  # a warning per failed write, then the one error line
        lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
        assert code == 1 and len(lines) == 1 and "Traceback" not in out + err, out + err
        assert f"{output} not updated: No space left on device" in lines[0] and "saved to" not in out
        assert json.loads(output.read_text()) == OLD
        return
    assert code == 0, out + err
    assert f"saved to {output} under {key!r}" in out
    data = json.loads(output.read_text())
    assert data[key]["trial"] == best and data[key]["params"] == study.trials[best].params
    assert data[key]["study"] == study.study_name
    if case == "file holds an older best":
        assert data["some:other:key"] == OLD["some:other:key"]


# --- a trial that runs out of GPU memory ------------------------------------------------------------------


def test_out_of_memory_trial(tmp_path, monkeypatch):
    """The failing trial is recorded failed with the reason, what it allocated is freed before the next
    trial starts, and the search goes on."""
    import torch

    from optimize.measure import evaluator as measure

    original = measure.Evaluator.measure
    calls, held, freed = [], [], []

    def oom_once(self, config, **kwargs):
        calls.append(config.label())
        if held:
            freed.append(held[0]() is None)
        if len(calls) == 3:  # call 1 is the baseline, 2 is trial #0, 3 is trial #1
            activations = torch.ones(1 << 20)  # what the trial had allocated when memory ran out
            held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, config, **kwargs)

    real_free = runner.free_memory
    after_failure = []

    def spy():
        real_free()
        after_failure.append(held[0]() is None)

    monkeypatch.setattr(measure.Evaluator, "measure", oom_once)
    monkeypatch.setattr(runner, "free_memory", spy)
    code, out, err = _run(tmp_path, monkeypatch, "--max-loss", "0.05", "--n-trials", "3")
    assert code == 0, out + err
    study = load_study(storage_url(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    error = study.trials[1].user_attrs["error"]
    assert error.startswith("OutOfMemoryError: CUDA out of memory")
    line = next(line for line in out.splitlines() if line.startswith("#1 "))
    assert "fail: OutOfMemoryError: CUDA out of memory" in line
    assert after_failure == [True]  # freed once, right after the failed trial
    assert freed == [True]  # and before the next trial measured anything
    assert len(calls) == 4


# --- the storage fails during a run ------------------------------------------------------------------------


def test_storage_fails_during_a_run(tmp_path, monkeypatch):
    """The database goes away while trial #1 runs (its end cannot be written): one line, exit 1; the
    completed trial is kept, and the next run re-runs the trial left running."""
    import time

    from optimize.measure import evaluator as measure

    original = measure.Evaluator.measure
    calls, down = [], []

    def measure_then_outage(self, config, **kwargs):
        calls.append(1)
        result = original(self, config, **kwargs)
        if len(calls) == 3:  # call 1 is the baseline, 2 is trial #0, 3 is trial #1
            down.append(True)
        return result

    def fails(real):
        def method(self, *args, **kwargs):
            if down:
                raise optuna.exceptions.StorageInternalError("server closed the connection unexpectedly")
            return real(self, *args, **kwargs)
        return method

    rdb = optuna.storages.RDBStorage
    monkeypatch.setattr(measure.Evaluator, "measure", measure_then_outage)
    for name in ("set_trial_state_values", "get_trial"):
        monkeypatch.setattr(rdb, name, fails(getattr(rdb, name)))
    code, out, err = _run(tmp_path, monkeypatch, "--max-loss", "0.05", "--n-trials", "3", "--heartbeat", "1")
    line = one_error_line(code, out, err, exit_code=1)
    assert "storage sqlite:///" in line and "failed: server closed the connection unexpectedly" in line
    assert "completed trials are kept and a running trial is retried when the study next runs" in line
    monkeypatch.undo()

    study = load_study(storage_url(tmp_path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    time.sleep(2.5)  # the heartbeat's grace period
    code, out, err = _run(tmp_path, monkeypatch, "--max-loss", "0.05", "--n-trials", "1", "--heartbeat", "1")
    assert code == 0, out + err
    trials = load_study(storage_url(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].params == study.trials[1].params


def test_postgresql_goes_away_during_a_run(tmp_path, monkeypatch):
    """A real outage: the study's database stops taking connections and its sessions are ended while
    trial #1 runs. One line naming the database's error, exit 1; once it is back, the next run re-runs
    the interrupted trial and trial #0 is still there."""
    import time

    import psycopg2
    from sqlalchemy.engine import make_url

    try:
        from pgserver import fresh_database, require_server
    except ImportError:
        from tests.pgserver import fresh_database, require_server
    from optimize.measure import evaluator as measure

    base = require_server()
    url = fresh_database(base)
    db = make_url(url).database

    def admin(*statements):
        con = psycopg2.connect(base, connect_timeout=10)
        con.autocommit = True
        try:
            for sql, *params in statements:
                con.cursor().execute(sql, *params)
        finally:
            con.close()

    original = measure.Evaluator.measure
    calls = []

    def measure_then_outage(self, config, **kwargs):
        calls.append(1)
        result = original(self, config, **kwargs)
        if len(calls) == 3:  # call 1 is the baseline, 2 is trial #0, 3 is trial #1
            admin((f"ALTER DATABASE {db} ALLOW_CONNECTIONS false",),
                  ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)))
        return result

    monkeypatch.setattr(measure.Evaluator, "measure", measure_then_outage)
    args = ["--max-loss", "0.05", "--heartbeat", "1"]
    line = one_error_line(*_run(tmp_path, monkeypatch, *args, "--n-trials", "3", url=url), exit_code=1)
    assert f'database "{db}" is not currently accepting connections' in line
    assert "completed trials are kept and a running trial is retried when the study next runs" in line
    monkeypatch.undo()

    admin((f"ALTER DATABASE {db} ALLOW_CONNECTIONS true",))
    time.sleep(2.5)  # the heartbeat's grace period
    code, out, err = _run(tmp_path, monkeypatch, *args, "--n-trials", "1", url=url)
    assert code == 0, out + err
    study = optuna.load_study(study_name="tiny-ddim-8steps-max-loss0.05", storage=storage.open_storage(url))
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[2].system_attrs["failed_trial"] == 1 and trials[2].params == trials[1].params


# --- small gaps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "generate"])
def test_a_seed_beyond_64_bits_is_refused_before_anything(command, tmp_path, monkeypatch, no_model):
    """torch's generators take 64-bit seeds: a larger one failed only once the study existed."""
    seed = str(2**64)
    if command == "run":
        code, out, err = _run(tmp_path, monkeypatch, "--seed", seed)
    else:
        monkeypatch.chdir(tmp_path)
        code, out, err = run_cli(["generate", "a cat", "--seed", seed])
    line = one_error_line(code, out, err)
    assert "--seed" in line and seed in line and "9223372036854775807" in line, line
    assert os.listdir(tmp_path) == []


def test_target_speedup_nan_is_not_a_finite_number(tmp_path, monkeypatch, no_model):
    line = one_error_line(*_run(tmp_path, monkeypatch, "--target-speedup", "nan"))
    assert "--target-speedup must be a finite number, got nan" in line, line


@pytest.mark.parametrize("entries,key,needle", [
    ({"tiny:ddim:8:max:0.05": {"pipe": "tiny"}}, None, "[tiny:ddim:8:max:0.05]: missing params"),
    ({"a": {"pipe": "tiny"}, "b": [1]}, None, "[a, b]: missing params"),
    ({"a": {"pipe": "tiny"}, "b": {"pipe": "tiny", "params": {}}}, "a", "[a]: missing params"),
])
def test_generate_names_an_entry_without_params(entries, key, needle, tmp_path, monkeypatch, no_model):
    """It said "has 0 entries"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sp.json").write_text(json.dumps(entries))
    line = one_error_line(*run_cli(["generate", "--params", "sp.json", *(["--key", key] if key else []), "a cat"]))
    assert f"sp.json {needle}" in line, line
    assert "0 entries" not in line


def test_a_huge_one_line_prompt_file_is_too_long_not_too_short(tmp_path, monkeypatch, no_model):
    """A 10 MB file without line breaks is one prompt: say it is too long, not that the file "has 1
    prompts" for --num-samples 2."""
    (tmp_path / "p.txt").write_text("x" * 10_000_000)
    line = one_error_line(*_run(tmp_path, monkeypatch, "--prompts", "p.txt", "--num-samples", "2"))
    assert "'p.txt' line 1: a prompt may have at most 1000 characters" in line, line
    (tmp_path / "p.txt").write_text("a cat\n")
    line = one_error_line(*_run(tmp_path, monkeypatch, "--prompts", "p.txt", "--num-samples", "2"))
    assert "'p.txt' has 1 prompt, fewer than --num-samples 2" in line, line


def test_the_lpips_note_says_what_is_recorded(monkeypatch):
    """It read as cut off: "...; PSNR and SSIM are"."""
    import numpy as np
    from PIL import Image

    monkeypatch.setattr(runner, "lpips_available", lambda: False)
    lines = []
    opts = runner.RunOptions(**{**_OPTS, "goal": runner.Goal("max", None, 0.15, "ssim")})
    runner.fidelity_scorer([Image.fromarray(np.zeros((8, 8, 3), np.uint8))], opts, lambda line, err=False: lines.append(line))
    assert len(lines) == 1 and lines[0].startswith("note: LPIPS not recorded") and lines[0].endswith(
        "; PSNR and SSIM are recorded"), lines


_OPTS = dict(scheduler="ddim", device="cpu", dtype="fp32", steps=8, guidance=None, height=None, width=None, batch_size=1,
             prompt_spec="builtin", num_samples=2, clip_model="tiny-clip", clip_pretrained=None, repeats=0,
             scored_repeats=0, goal=None, methods=("deepcache",), n_trials=1, storage="sqlite:///s.db",
             study_name=None, seed=42, output="sp.json", heartbeat=60, progress=False)


@pytest.mark.parametrize("command", ["report", "generate"])
def test_report_or_generate_into_a_read_only_folder_names_the_file(command, tmp_path, monkeypatch, read_only, no_model):
    """Refused before the study is read or a model loads, naming the output, not a temporary file."""
    from helpers import synthetic_study
    from optimize.study.record import Goal

    monkeypatch.chdir(tmp_path)
    synthetic_study(storage_url(tmp_path), "s", Goal("max", None, 0.05), [])
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    out = "locked/r.html" if command == "report" else "locked/x.png"
    argv = ["report", "--storage", storage_url(tmp_path), "-o", out] if command == "report" else [
        "generate", "a cat", "--storage", storage_url(tmp_path), "-o", out]
    line = one_error_line(*run_cli(argv))
    assert f"cannot write {out}: directory {locked} is not writable; pass another -o" in line, line
    assert ".tmp" not in line and os.listdir(locked) == []


def test_an_atomic_write_that_cannot_start_names_the_file(tmp_path, read_only):
    from optimize.study.files import atomic_write

    read_only(tmp_path)
    with pytest.raises(OSError) as e:
        atomic_write(str(tmp_path / "r.html"), "<html>")
    assert str(e.value).startswith(f"cannot write {tmp_path / 'r.html'}: ") and ".tmp" not in str(e.value)


def test_a_mode_444_search_params_file_is_refused_even_for_root(tmp_path, monkeypatch, no_model):
    """The README promises a read-only file is never replaced; root passes os.access, so the mode bits
    decide."""
    output = tmp_path / "search_params.json"
    output.write_text(json.dumps(OLD))
    output.chmod(0o444)
    line = one_error_line(*_run(tmp_path, monkeypatch, "--output", output))
    assert f"{output} is read-only: make it writable or pass another --output" in line, line
    assert json.loads(output.read_text()) == OLD


@pytest.mark.parametrize("command", ["generate", "report", "run"])
def test_a_mode_555_folder_is_refused_even_for_root(command, tmp_path, monkeypatch, no_model):
    """A folder without write bits is not written into, by root either (whom os.access lets write
    anywhere): as root, generate wrote its image into a mode-555 folder, report its file, run its
    search_params.json."""
    from helpers import synthetic_study
    from optimize.study.record import Goal

    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if command == "run":
            output, option = locked / "search_params.json", "--output"
            result = _run(tmp_path, monkeypatch, "--output", output)
        else:
            synthetic_study(storage_url(tmp_path), "s", Goal("max", None, 0.05), [])
            output, option = locked / ("x.png" if command == "generate" else "r.html"), "-o"
            words = ["a cat"] if command == "generate" else []
            result = run_cli([command, *words, "--storage", storage_url(tmp_path), "-o", output])
        line = one_error_line(*result)
        assert f"cannot write {output}: directory {locked} is not writable; pass another {option}" in line, line
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_a_folder_made_read_only_during_a_run_is_not_written(tmp_path):
    """search_params.json's folder made mode 555 after the run's check: not updated (the run says so and
    exits 1), whoever runs it."""
    from optimize.app.params_file import update_search_params

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="its directory is read-only"):
            update_search_params(str(locked / "search_params.json"), "k", {"params": {}})
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_the_demos_artifacts_are_git_ignored():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if subprocess.run(["git", "-C", root, "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for path in ("studies/optimize-sd-artifacts/x.png", "studies/artifacts/x.png", "studies/optimize-sd.db"):
        assert subprocess.run(["git", "-C", root, "check-ignore", "-q", path]).returncode == 0, path


def test_the_readme_tells_cpu_users_of_the_cpu_build():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        assert "--index-url https://download.pytorch.org/whl/cpu" in f.read()
