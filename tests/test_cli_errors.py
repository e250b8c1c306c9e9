"""Every wrong invocation of every subcommand: one line on stderr, a non-zero exit, no traceback.

The real CLI runs in subprocesses (`python -m driftsync ...`), a few at a time; the help checks
build the parser in-process.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from driftsync.cli import build_parser
from driftsync.processes import free_port
from tests.conftest import REPO

DEAD = f"http://127.0.0.1:{free_port()}"  # nothing listens here
SCRATCH = str(Path(tempfile.gettempdir()) / "driftsync-cli-errors")  # where a refused replay may make its --out
PHOTOS = "tests/data/imagenet-photos"  # class folders named by ImageNet wnids

# (subcommand words, extra environment, a phrase the one line must contain)
CASES: list[tuple[list[str], dict[str, str], str]] = [
    ([], {}, "required: COMMAND"),
    (["nosuch"], {}, "invalid choice: 'nosuch'"),
    (["--log-level", "loud", "demo"], {}, "--log-level"),
    (["serve", "--port", "-5"], {}, "--port: must be from 0 to 65535, got '-5'"),
    (["serve", "--teacher-optimizer", "rmsprop"], {}, "expected one of sgd, adam"),
    (["serve", "--guarded-push", "true"], {}, "unrecognized arguments: true"),
    (["serve"], {"DRIFTSYNC_GUARDED_PUSH": "maybe"}, "expected a boolean"),
    (["serve", "--student", "nope"], {}, "unknown model 'nope'"),
    (["serve", "--ssl-certfile", "/nonexistent/cert.pem"], {}, "is not a file"),
    (["device", "--sink", "bogus"], {}, "unknown sink 'bogus'"),
    (["device", "--server", "ftp://example"], {}, "http:// or https://"),
    (["device", "--source", "tape"], {}, "expected one of folder"),
    (["device", "--batch-size", "0"], {}, "--batch-size: must be >= 1"),
    (["device", "--normalization", "sampled", "--stats-sample", "0"], {}, "--stats-sample: must be >= 1"),
    (["replay", "--normalization", "sampeld"], {}, "--normalization"),
    (["serve", "--student-steps", "0"], {}, "--student-steps: must be >= 1"),
    (["serve"], {"DRIFTSYNC_STUDENT_STEPS": "twice"}, "--student-steps"),
    (["serve", "--learn", "everything"], {}, "expected one of auto, norm"),
    (["serve", "--conv-lr", "0"], {}, "--conv-lr: must be > 0.0"),
    (["serve"], {"DRIFTSYNC_CONV_LR": "fast"}, "--conv-lr"),
    (["demo", "--devices", "0"], {}, "--devices: must be >= 1, got '0'"),
    (["demo", "--severity", "9"], {}, "--severity: must be from 1 to 5, got '9'"),
    (["demo", "--corruptions", "rain"], {}, "unknown corruptions ['rain']"),
    (["demo", "--fps", "0"], {}, "--fps: must be > 0.0"),
    (["demo", "--fps", "nan"], {}, "--fps: expected a finite number, got 'nan'"),
    (["replay", "--method", "foo"], {}, "unknown 'foo'"),
    (["replay", "--dataset", "cifar10"], {}, "--dataset cifar10 needs --data PATH"),
    (["replay", "--class-index", "/nonexistent/classes.txt"], {}, "--class-index: /nonexistent/classes.txt is not a file"),
    (["replay", "--dataset", "cifar10", "--data", "x.npz", "--class-index", "README.md"], {},
     "--class-index names class folders"),
    (["replay", "--dataset", "folder", "--data", PHOTOS, "--method", "source", "--out", SCRATCH], {},
     "4 of 4 class folders in tests/data/imagenet-photos are not classes of the model"),
    (["replay", "--dataset", "imagenet-c", "--data", PHOTOS, "--class-index", "server/models/imagenet_classes.txt",
      "--method", "source", "--out", SCRATCH], {}, "lists 1000 classes but the model has"),
    (["fleet", "--port", "70000"], {}, "--port: must be from 0 to 65535"),
    (["fleet", "--compose", "/nonexistent/compose.yml"], {}, "is not a file"),
    (["loadtest", "--server", DEAD, "--duration-s", "1"], {}, f"no healthy driftsync server at {DEAD}"),
    (["loadtest", "--upload-ratio", "2"], {}, "--upload-ratio: must be"),
    (["export", "--student", "nope"], {}, "unknown model 'nope'"),
    (["export", "--student", "embedded-student:/nonexistent/student.pt"], {}, "does not exist"),
    (["serve", "--teacher", "embedded-teacher+resnet20"], {}, "must classify the same classes at the same input size"),
    (["replay", "--teacher", "embedded-teacher+resnet56:/nonexistent/r56.th"], {}, "does not exist"),
    (["corrupt"], {}, "required: --input, --output"),
    (["corrupt", "--input", "/nonexistent", "--output", "x"], {}, "is not a directory"),
    (["corrupt", "--input", ".", "--output", "x", "--severities", "7"], {}, "outside 1..5"),
    (["train", "--models", "nope"], {}, "unknown 'nope'"),
    (["db"], {}, "required: db_command"),
]


def _run(words: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "driftsync", *words], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=dict(os.environ, **env))


@pytest.fixture(scope="module")
def results() -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(4) as pool:  # the cases are independent: run a few at once
        return list(pool.map(lambda case: _run(case[0], case[1]), CASES))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[" ".join(c[0]) or "(nothing)" for c in CASES])
def test_a_wrong_invocation_is_one_line_and_a_nonzero_exit(results, index: int) -> None:
    words, _, phrase = CASES[index]
    result = results[index]
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert phrase in lines[0]
    assert lines[0].startswith("driftsync")


def test_serve_on_a_taken_port_fails_in_one_line_before_loading_models() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(["serve", "--port", str(port)], {})
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"driftsync serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_debug_logging_shows_the_traceback_of_an_expected_error() -> None:
    result = _run(["--log-level", "debug", "loadtest", "--server", DEAD], {})
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("driftsync loadtest: error:")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# once per item, no single variable (--profile falls back to COMPOSE_PROFILES, as docker compose does)
REPEATABLE = {("fleet", "--scale"), ("fleet", "--env"), ("fleet", "--profile"), ("fleet", "--until-exit")}


@pytest.mark.parametrize("name", list(_subcommands()))
def test_help_has_a_description_examples_and_every_flags_variable_and_default(name: str) -> None:
    parser = _subcommands()[name]
    assert parser.description and (parser.epilog or "").startswith("examples:\n  driftsync ")
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:  # help, `db`'s subcommands
            continue
        if (name, action.option_strings[0]) in REPEATABLE:
            continue
        assert "[env DRIFTSYNC_" in action.help and ("; default " in action.help or "; required]" in action.help), \
            (name, action.option_strings)
        if isinstance(action.default, bool):  # yes/no flags are switches, never a bare placeholder
            assert isinstance(action, argparse.BooleanOptionalAction), (name, action.option_strings)


def test_switches_take_no_value_and_the_variable_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(argv: list[str]) -> argparse.Namespace:
        return build_parser().parse_args(argv)  # a fresh parser reads the variables as they are now

    assert parse(["serve", "--guarded-push", "--no-adapt-teacher"]).guarded_push is True
    assert parse(["serve"]).guarded_push is False and parse(["serve"]).adapt_teacher is True
    monkeypatch.setenv("DRIFTSYNC_GUARDED_PUSH", "yes")
    assert parse(["serve"]).guarded_push is True
    assert parse(["serve", "--no-guarded-push"]).guarded_push is False  # the flag wins over the variable
    monkeypatch.setenv("DRIFTSYNC_REPEAT", "true")
    assert parse(["device"]).repeat is True


def test_device_predictions_go_to_stdout_by_default() -> None:
    assert build_parser().parse_args(["device"]).sink == "jsonl:-"
    assert build_parser().parse_args(["device", "--sink", "none"]).sink == "none"


def test_top_level_help_describes_the_device_daemon() -> None:
    text = " ".join(build_parser().format_help().split())  # argparse wraps lines
    assert "daemon for folders, video, cameras, stdin and replays" in text


def _imagenet_c_tree(root, corruptions: tuple[str, ...], per_class: int) -> list[str]:
    """<root>/<corruption>/5/<wnid>/*.JPEG for 10 wnids; returns the wnids (the embedded student's class count)."""
    from PIL import Image

    wnids = [f"n{i:08d}" for i in range(10)]
    for corruption in corruptions:
        for wnid in wnids:
            (root / corruption / "5" / wnid).mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (32, 32), (20 * k, 90, 120)).save(root / corruption / "5" / wnid / f"{k}.JPEG")
    (root.parent / "classes.txt").write_text("\n".join(wnids) + "\n")
    return wnids


def _replay_imagenet_c(root, *flags: str) -> subprocess.CompletedProcess:
    return _run(["replay", "--dataset", "imagenet-c", "--data", str(root), "--class-index",
                 str(root.parent / "classes.txt"), "--method", "source", "--out", str(root.parent / "out"), *flags], {})


def _one_clear_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("driftsync replay: error: ")
    return lines[0]


def test_a_partial_imagenet_c_tree_with_every_corruption_says_what_is_missing(tmp_path) -> None:
    root = tmp_path / "ImageNet-C"
    _imagenet_c_tree(root, ("fog", "contrast"), 1)
    line = _one_clear_line(_replay_imagenet_c(root))  # --corruptions all, the default
    assert "lacks 13 of the 15 corruption/severity folders" in line
    assert "gaussian_noise/5" in line and "jpeg_compression/5" in line and "fog/5," not in line
    assert "pass --corruptions fog,contrast to replay what is there" in line  # CoTTA order
    assert not (tmp_path / "out" / "stream").exists()  # refused before anything ran


def test_more_samples_than_a_domain_has_is_one_line(tmp_path) -> None:
    root = tmp_path / "ImageNet-C"
    _imagenet_c_tree(root, ("fog", "contrast"), 2)
    line = _one_clear_line(_replay_imagenet_c(root, "--corruptions", "fog,contrast", "--samples-per-domain", "50"))
    assert "--samples-per-domain 50 is more than a domain has (fog/5 has 20, contrast/5 has 20)" in line
    assert "ask for at most 20, or 'none'" in line
