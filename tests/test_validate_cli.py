"""`spin validate` (the real console script): exit codes and one clear line per problem, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPIN = Path(sys.executable).with_name("spin")
EXAMPLES = ROOT / "manifests" / "examples"
TINY = (EXAMPLES / "spinrun-tiny.yaml").read_text()


def spin(*args: str | Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(SPIN), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    return done


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_with(**spec_changes: object) -> str:
    doc = yaml.safe_load(TINY)
    doc["spec"].update(spec_changes)
    return yaml.safe_dump(doc, sort_keys=False)


def problems(done: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    """The problem lines, each checked to be one `path: field: message` line."""
    lines = done.stderr.splitlines()
    assert lines, done.stdout
    for line in lines:
        assert line.startswith(f"{path}: "), line
    return [line.removeprefix(f"{path}: ") for line in lines]


@pytest.mark.parametrize("name", ["spinrun-tiny.yaml", "spinrun-zephyr-7b.yaml"])
def test_examples_are_valid(name):
    done = spin("validate", EXAMPLES / name)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "is valid" in done.stdout


def test_several_files_one_bad(tmp_path):
    bad = write(tmp_path, tiny_with(iterations=0))
    done = spin("validate", EXAMPLES / "spinrun-tiny.yaml", bad)
    assert done.returncode == 1
    assert "SpinRun 'tiny' is valid (2 iterations)" in done.stdout
    assert problems(done, bad) == ["spec.iterations: must be greater than or equal to 1 (got 0)"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            TINY.replace("  iterations: 2", "  iterations: [2"),
            ["line 17, column 13: invalid YAML: expected ',' or ']', but got ':'"],
            id="bad-yaml",
        ),
        pytest.param(
            TINY.replace("    maxNewTokens: 8", "    maxNewTokens: 8\n   shards: 3"),
            ["line 22, column 4: invalid YAML: expected <block end>, but found '<block mapping start>'"],
            id="bad-indentation",
        ),
        pytest.param(
            TINY.replace("    maxNewTokens: 8", "    maxNewTokens: 8\n    shards: 3"),
            ["line 22, column 5: invalid YAML: duplicate key 'shards'"],
            id="duplicate-key",
        ),
        pytest.param(
            TINY.replace("apiVersion: selfplay.dev/v1alpha1", "apiVersion: selfplay.dev/v1"),
            ["apiVersion: must be 'selfplay.dev/v1alpha1' (got 'selfplay.dev/v1')"],
            id="wrong-apiversion",
        ),
        pytest.param(
            TINY.replace("kind: SpinRun", "kind: SpinJob"),
            ["kind: must be 'SpinRun' (got 'SpinJob')"],
            id="wrong-kind",
        ),
        pytest.param(
            TINY.replace("    learningRate: 3.0e-4", "    lerningRate: 3.0e-4"),
            ["spec.training.lerningRate: unknown field (did you mean learningRate?)"],
            id="unknown-field",
        ),
        pytest.param(
            tiny_with(generation={"topP": 1.5}),
            ["spec.generation.topP: must be less than or equal to 1 (got 1.5)"],
            id="out-of-range",
        ),
        pytest.param(
            TINY.replace("    loss: sigmoid", "").replace("    beta: 0.1", "    beta: 0.1\n    loss: dpo"),
            ["spec.training.loss: must be 'sigmoid', 'hinge' or 'ipo' (got 'dpo')"],
            id="wrong-enum",
        ),
        pytest.param(
            TINY.replace("uri: file://demo/sft-model", "uri: hf://zephyr-7b-sft"),
            [
                "spec.model.uri: must be s3://bucket/path (bucket: 3-63 lowercase letters, digits, '.' or '-') or "
                "file://path (got 'hf://zephyr-7b-sft')"
            ],
            id="bad-uri-scheme",
        ),
        pytest.param(
            TINY.replace("  storage:\n    uri: file://demo/runs/tiny\n", ""),
            ["spec.storage: required field is missing"],
            id="missing-required",
        ),
        pytest.param(
            TINY.replace("  name: tiny", "  name: Tiny_Run"),
            [
                "metadata.name: must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter "
                "and ending with a letter or digit (it names the run's PyTorchJobs and Services, which Kubernetes "
                "requires so) (got 'Tiny_Run')"
            ],
            id="bad-name",
        ),
        pytest.param(
            TINY.replace("  name: tiny", "  name: " + "t" * 38),
            [f"metadata.name: must have at most 37 characters (got '{'t' * 38}')"],
            id="name-too-long",
        ),
        pytest.param(
            tiny_with(schedule=[{"iteration": 1, "beta": 0.2}, {"iteration": 3, "learningRate": 1e-5}]),
            [
                "spec.schedule[1].iteration: iteration 3 does not exist: the run has 2 iterations (spec.iterations); "
                "allowed is 1 to 2"
            ],
            id="schedule-iteration-missing",
        ),
        pytest.param(
            TINY.replace("    maxPromptLength: 48", "    maxPromptLength: 64"),
            ["spec.training.maxPromptLength: must be smaller than maxLength (64), got 64"],
            id="prompt-longer-than-sequence",
        ),
        pytest.param(
            TINY.replace("  iterations: 2", "  iterations: '2'\n  suspend: maybe"),
            [
                "spec.iterations: must be a valid integer (got '2')",
                "spec.suspend: must be a valid boolean (got 'maybe')",
            ],
            id="two-problems",
        ),
        pytest.param("- just\n- a list\n", ["expected a mapping (a SpinRun object), got list"], id="not-a-mapping"),
        pytest.param("# nothing here\n", ["no document in file"], id="empty"),
    ],
)
def test_bad_files_give_one_line_per_problem(tmp_path, text, expected):
    path = write(tmp_path, text)
    done = spin("validate", path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert problems(done, path) == expected


def test_multi_document_file_with_one_bad_document(tmp_path):
    second = yaml.safe_load(TINY)
    second["metadata"]["name"] = "tiny-2"
    second["spec"]["training"]["zeroStage"] = 1
    second["spec"]["dataset"]["format"] = "chatml"
    path = write(tmp_path, TINY + "---\n" + yaml.safe_dump(second, sort_keys=False))
    done = spin("validate", path)
    assert done.returncode == 1
    assert problems(done, path) == [
        "document 2: spec.dataset.format: must be 'messages' or 'prompt-response' (got 'chatml')",
        "document 2: spec.training.zeroStage: must be 0, 2 or 3 (got 1)",
    ]


def test_multi_document_file_all_good(tmp_path):
    second = yaml.safe_load(TINY)
    second["metadata"]["name"] = "tiny-2"
    path = write(tmp_path, TINY + "---\n" + yaml.safe_dump(second, sort_keys=False))
    done = spin("validate", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("is valid") == 2


def test_json_file_with_a_syntax_error(tmp_path):
    path = write(tmp_path, '{"apiVersion": "selfplay.dev/v1alpha1",\n "kind": "SpinRun",,}', "run.json")
    done = spin("validate", path)
    assert done.returncode == 1
    assert problems(done, path) == [
        "line 2, column 20: invalid JSON: Expecting property name enclosed in double quotes"
    ]


def test_missing_directory_and_binary_files(tmp_path):
    missing, folder, binary = tmp_path / "nope.yaml", tmp_path / "folder", tmp_path / "model.bin"
    folder.mkdir()
    binary.write_bytes(b"\x00\xff\xfe\x80 not text")
    done = spin("validate", missing, folder, binary)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{missing}: cannot read file: No such file or directory",
        f"{folder}: cannot read file: Is a directory",
        f"{binary}: cannot read file: not UTF-8 text (byte 1)",
    ]


def test_no_file_is_a_usage_error():
    done = spin("validate")
    assert done.returncode == 2
    assert "Missing argument" in done.stderr


def test_numbers_are_read_as_kubectl_reads_them(tmp_path):
    """`1e-4` is a number for kubectl (YAML 1.2) though a string for plain PyYAML (YAML 1.1)."""
    path = write(tmp_path, TINY.replace("learningRate: 3.0e-4", "learningRate: 3e-4"))
    done = spin("validate", path)
    assert done.returncode == 0, done.stderr
