"""The `glm4` command line, through main(argv)."""

import io
import json

import pytest
from helpers import build_tiny_checkpoint

from glm4.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_checkpoint(folder)
    return str(folder)


def run(argv, stdin=""):
    out = io.StringIO()
    import sys

    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        code = main(argv, out=out)
    finally:
        sys.stdin = old
    return code, out.getvalue()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "glm4 0.1.0" in capsys.readouterr().out


def test_generate_streams_a_reply(checkpoint):
    code, out = run(
        ["generate", "Hello world!", "--model", checkpoint, "--max-new-tokens", "8", "--device", "cpu"]
    )
    assert code == 0 and out.endswith("\n") and len(out) > 1


def test_generate_sampling_is_seeded(checkpoint):
    argv = ["generate", "Hello", "--model", checkpoint, "--max-new-tokens", "12", "--temperature", "1.0"]
    first = run([*argv, "--seed", "1", "--top-p", "0.9", "--top-k", "50"])
    assert first == run([*argv, "--seed", "1", "--top-p", "0.9", "--top-k", "50"])
    assert first[0] == 0


def test_generate_raw(checkpoint):
    code, out = run(["generate", "Hello", "--raw", "--model", checkpoint, "--max-new-tokens", "5"])
    assert code == 0


def test_missing_model_is_one_clear_line(capsys, tmp_path):
    code, _ = run(["generate", "hi", "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("glm4: error:") and "does not exist" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_tools_file(capsys, checkpoint, tmp_path):
    bad = tmp_path / "tools.json"
    bad.write_text("{not json")
    assert run(["generate", "hi", "--model", checkpoint, "--tools", str(bad)])[0] == 1
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"a": 1}))
    assert run(["generate", "hi", "--model", checkpoint, "--tools", str(bad)])[0] == 1
    assert "JSON list" in capsys.readouterr().err


def test_chat_session(checkpoint):
    stdin = "Hello\n/reset\nfirst line\\\nsecond line\n\n/exit\n"
    code, out = run(["chat", "--model", checkpoint, "--max-new-tokens", "4", "--system", "Be brief."], stdin)
    assert code == 0
    assert "(chat cleared)" in out and "... " in out  # the continuation prompt of a multi-line message
    assert out.count("> ") >= 4


def test_chat_ends_at_eof(checkpoint):
    assert run(["chat", "--model", checkpoint, "--max-new-tokens", "2"], "Hello\n")[0] == 0


def test_quantize_flag_on_the_demo_model(capsys):
    assert main(["generate", "What is the capital of Japan?", "--quantize", "int8", "--device", "cpu"]) == 0
    assert "Tokyo" in capsys.readouterr().out


def test_chat_tool_call_asks_for_the_result(tmp_path):
    from glm4.demo.train import WEATHER_TOOL

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER_TOOL]))
    stdin = 'What is the weather in Paris?\n{"weather": "sunny"}\n/exit\n'
    code, out = run(["chat", "--tools", str(tools), "--device", "cpu", "--max-new-tokens", "16"], stdin)
    assert code == 0
    assert '[tool call] get_weather({"city": "Paris"})' in out
    assert "result of get_weather> " in out
    # The reply to the observation was generated after the result (whatever the toy model says).
    assert out.index("result of get_weather> ") < out.rindex("> ")


def test_the_first_compiled_step_is_announced_on_stderr(checkpoint, capsys, monkeypatch):
    """Compiling takes seconds to minutes on a real model: the command says so before and after."""
    import logging

    import glm4.steps
    from glm4.cli import Progress

    monkeypatch.setattr(glm4.steps, "should_compile", lambda model, max_new_tokens: True)
    monkeypatch.setattr(glm4.steps, "_compiled", set())  # as in a new process
    log = logging.getLogger("glm4")
    try:
        code, out = run(["generate", "Hello", "--model", checkpoint, "--max-new-tokens", "4"])
        err = capsys.readouterr().err.splitlines()
        assert code == 0 and out
        assert err[0].startswith("glm4: compiling the decode step for batch 1, 512 cache positions (once)")
        assert err[1].startswith("glm4: compiled in") and len(err) == 2
        code, out = run(["generate", "Hello", "--model", checkpoint, "--max-new-tokens", "4"])
        assert code == 0 and capsys.readouterr().err == ""  # the same model again: its graph is there
    finally:
        log.handlers = [h for h in log.handlers if not isinstance(h, Progress)]
        log.setLevel(logging.NOTSET)
