"""The README's usage examples, run as written against a tiny genuinely trained pair: the hub ids
in them become the pair's folders, nothing else changes. If an example stops working, this fails."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from test_server import free_port, wait_healthy

README = Path(__file__).resolve().parent.parent / "README.md"
BASE_ID, FINETUNED_ID = "meta-llama/Llama-2-7b-hf", "lmsys/vicuna-7b-v1.5"


def blocks(language: str, after: str) -> list[str]:
    """The fenced `language` blocks of the README section that starts with the line `after`."""
    text = README.read_text()
    section = text[text.index(after):]
    section = section[: section.find("\n## ", 1) if section.find("\n## ", 1) > 0 else None]
    return [re.sub(r"^ {2}", "", block, flags=re.M) for block in re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)]


@pytest.fixture(scope="module")
def session(llama_pair, tmp_path_factory, monkeypatch_module):
    """The README's first session (its bash block), run in a fresh folder: the server is left running."""
    folder = tmp_path_factory.mktemp("first-hour")
    monkeypatch_module.chdir(folder)
    base, finetuned = map(str, llama_pair)
    commands = blocks("bash", "A first session")[0]
    server = None
    for line in commands.strip().splitlines():
        line = line.split("#")[0].replace(BASE_ID, base).replace(FINETUNED_ID, finetuned)
        args = shlex.split(line)
        assert args[0] == "bitdelta", line
        if args[1] == "serve":
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "bitdelta.server", *args[2:], "--port", str(port), "--device", "cpu"],
                                      stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"))
            wait_healthy(f"http://127.0.0.1:{port}", server, log=folder / "server.log")
        else:
            code, out, err = run_cli(*args[1:])
            assert code == 0, f"{line}\n{out}\n{err}"
    yield folder, port, (base, finetuned)
    server.terminate()
    server.wait(20)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_first_session_writes_what_it_says(session):
    folder, _, _ = session
    assert (folder / "deltas" / "vicuna" / "bitdelta_config.json").is_file()
    assert (folder / "vicuna-merged" / "config.json").is_file()


def test_the_openai_client_example_runs_against_that_server(session, capsys):
    _, port, _ = session
    chat = next(b for b in blocks("python", "- **serve**") if "OpenAI(" in b)
    namespace = {}
    exec(chat.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}"), namespace)
    reply = namespace["reply"]  # sampled: it may end early on EOS, or be blank on a tiny model
    assert reply.model == "vicuna" and reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
    assert capsys.readouterr().out == reply.choices[0].message.content + "\n"


def test_the_python_examples_run_as_written(session, capsys, tmp_path, monkeypatch):
    _, _, (base, finetuned) = session
    monkeypatch.chdir(tmp_path)  # they write the same names as the session
    namespace: dict = {}
    for code in blocks("python", "### Python"):
        exec(code.replace(BASE_ID, base).replace(FINETUNED_ID, finetuned), namespace)
    text, reason, tokens = capsys.readouterr().out.rstrip("\n").splitlines()[-1].rsplit(" ", 2)
    assert reason in ("length", "stop") and int(tokens) > 0
    assert namespace["model"].bitdelta_routing is not None and Path(namespace["delta_dir"]).is_dir()
