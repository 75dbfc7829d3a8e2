"""The command line as a user meets it: real subprocesses, no tracebacks for user errors."""

import json
import os
import subprocess
import sys

import pytest


def run(*args: str, env_profile: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "agent.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "models" in result.stdout and "demo" in result.stdout


def test_help_does_not_import_heavy_libraries():
    code = "import sys; from agent.cli.main import main; main(['--help']) if False else None; " \
           "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args, message", [
    (("--profile", "nope", "models"), "no profile is called 'nope'"),
    (("--profile", "full", "demo"), "Qwen/Qwen2.5-7B-Instruct"),
    (("--profile", "/no/such/profile.yaml", "models"), "does not exist"),
])
def test_user_errors_are_one_clear_line_not_a_traceback(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr


def test_models_lists_the_tiny_profile():
    result = run("--profile", "tiny", "models")
    assert result.returncode == 0
    for role in ("backbone", "image encoder", "image generator", "input projector (image)"):
        assert role in result.stdout


def test_a_corrupt_training_manifest_names_file_and_line(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                        '{"messages": [\n')
    config = tmp_path / "train.yaml"
    config.write_text(f"profile: tiny\nout_dir: {tmp_path / 'out'}\nstages:\n  - name: pt\n    data: [{manifest}]\n")
    result = run("train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{manifest}:2" in result.stderr


@pytest.mark.smoke
def test_kb_add_and_search_through_the_cli(tmp_path):
    """Real MiniLM, real sqlite-vec file: ingest the shipped notes, find the offsite by paraphrase."""
    config = tmp_path / "signalgraph.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nallowed_dirs: [{tmp_path}]\n")
    notes = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples" / "notes"
    added = run("--config", str(config), "kb", "add", str(notes))
    assert added.returncode == 0, added.stderr
    assert "3 files ingested" in added.stdout
    found = run("--config", str(config), "kb", "search", "where is the spring trip?", "-k", "2")
    assert found.returncode == 0 and found.stdout.startswith("1. [")
    assert "team-offsite.md#0" in found.stdout.splitlines()[0]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.png", "does not exist"),
    (lambda d: (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really") and d / "broken.png", "broken.png"),
    (lambda d: (d / "cut.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ") and d / "cut.wav", "cut.wav"),
])
def test_ask_with_an_attachment_it_cannot_read_runs_no_turn_and_exits_2(tmp_path, make, message):
    path = make(tmp_path)
    kind = "--audio" if str(path).endswith(".wav") else "--image"
    env_home = {"SIGNALGRAPH_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "agent.cli.main", "--profile", "tiny", "ask", "What is this?", kind, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                                       **env_home})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert result.stdout.strip() == ""  # no answer about an image the model never saw
    as_json = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env_home})
    assert as_json.returncode == 2 and message in json.loads(as_json.stdout)["error"]["message"]


def test_a_file_the_user_types_is_read_from_any_folder(tmp_path):
    from PIL import Image

    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(elsewhere / "red.png")
    result = subprocess.run([sys.executable, "-m", "agent.cli.main", "--profile", "tiny", "ask", "What is this?",
                             "--image", str(elsewhere / "red.png"), "--json", "--trace"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SIGNALGRAPH_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    trace = json.loads(result.stdout)["trace"]
    assert next(e for e in trace if e["step"] == "ingest")["media"] == ["image-1"]


SUBCOMMANDS = ["chat", "ask", "plan", "kb add", "kb search", "sessions", "sessions delete", "train", "eval",
               "proof", "bench", "embodied", "models", "models prepare", "run", "runs", "demo", "serve"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_says_a_wrong_argument_in_one_line(command):
    result = run(*command.split(), "--no-such-option")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and line.endswith("--help`)")


@pytest.mark.parametrize("args, message", [
    (("serve", "--port", "0"), "--port"),
    (("bench", "--turns", "lots"), "--turns"),
    (("proof", "everything"), "invalid choice"),
    (("run", "/no/such/flow.yaml"), "flow.yaml"),
    (("runs", "no-such-run"), "no-such-run"),
    (("--profile", "tiny", "sessions", "delete", "nobody"), "nobody"),
    (("--profile", "tiny", "plan", "draw a cat", "--image", "/no/such.png"), "/no/such.png"),
])
def test_bad_values_are_one_line_and_exit_2(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "agent.cli.main", *args], capture_output=True, text=True,
                            timeout=300,
                            env={**os.environ, "SIGNALGRAPH_HOME": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # (building the tiny test models on first use may draw a progress bar before it)
    (line,) = [x for x in result.stderr.strip().splitlines() if "error" in x.lower()]
    assert line.startswith("error: ") and message in line
