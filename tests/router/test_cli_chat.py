"""`tandem generate` as a chat (--message/--system/--user, --thinking, --tools, --reasoning-effort)
over the router's real gRPC server and a scripted decode worker:
- the prompt the worker gets is the V4 encoding of the same conversation (`encoding.render`, fed
  with values built here, not with what the CLI sent);
- reasoning, answer and tool calls come out in text mode (reasoning dimmed, before the answer;
  calls after it) and in JSON lines (reasoning_text, tool_calls on the last chunk);
- each bad option is refused with one line naming it, before any request is sent.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.scripted import scripted_chat
from support.scripted_gateway import ScriptedGateway
from support.servers import grpc_router
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.router.chat.conversation import ChatOptions, Message, ReasoningEffort, Role, Tool
from orchestrator.router.chat.encoding import render
from orchestrator.router.chat.stream import call_id
from orchestrator.router.client import make_request
from tandem.tokenizer import ByteTokenizer
from tandem.v1 import generate_pb2

pytestmark = pytest.mark.router

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city.",
                                            "parameters": PARAMS}}]
CALL_TEXT = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
             '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
OUTPUT = "Need weather.</think>Checking Paris." + CALL_TEXT
PIECES = [OUTPUT[i:i + 9] for i in range(0, len(OUTPUT), 9)]  # steps cut the markers anywhere


@contextlib.contextmanager
def serving(pieces: list[str]) -> Iterator[tuple[str, ScriptedGateway]]:
    """A gRPC router over a decode worker that writes `pieces`, on a loop in a thread; its address."""
    gateway, frontend = scripted_chat(pieces, CollectorRegistry())
    with grpc_router(frontend) as address:
        yield address, gateway


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, ScriptedGateway]]:
    """The router over a worker that writes OUTPUT (no state file, no token from the environment)."""
    monkeypatch.setenv("TANDEM_STATE", "/nonexistent/state.json")
    monkeypatch.delenv("TANDEM_TOKEN", raising=False)
    with serving(PIECES) as out:
        yield out


@pytest.fixture()
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS))
    return path


def invoke(address: str, *args: str, env: dict[str, str] | None = None):  # noqa: ANN201 (click's Result)
    return CliRunner().invoke(app, ["generate", "--address", address, *args], env=env)


def test_worker_gets_the_encoded_conversation(served: tuple[str, ScriptedGateway], tools_file: Path) -> None:
    address, gateway = served
    out = invoke(address, "--system", "Be brief.", "--message", "user:Hi: there", "--message",
                 "assistant:Hello.", "--user", "Weather in Paris?", "--tools", str(tools_file),
                 "--reasoning-effort", "max", "--json")
    assert out.exit_code == 0, out.output
    conversation = (Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Hi: there"),
                    Message(Role.ASSISTANT, "Hello."), Message(Role.USER, "Weather in Paris?"))
    options = ChatOptions(thinking=True, effort=ReasoningEffort.MAX,
                          tools=(Tool("get_weather", "Weather by city.", json.dumps(PARAMS)),))
    expected = render(conversation, options)
    assert expected.startswith("Reasoning Effort: Absolute maximum") and "get_weather" in expected
    assert gateway.requests[0].prompt_ids == tuple(ByteTokenizer().encode(expected))  # BOS id, then the text
    # Chat mode, no tools: the prompt ends with </think> and no tools section.
    assert invoke(address, "--message", "developer:Be brief.", "--user", "Hi", "--json").exit_code == 0
    plain = render((Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Hi")), ChatOptions())
    assert plain == "Be brief.<｜User｜>Hi<｜Assistant｜></think>"
    assert gateway.requests[1].prompt_ids == tuple(ByteTokenizer().encode(plain))


def test_json_lines_carry_reasoning_answer_and_calls(served: tuple[str, ScriptedGateway],
                                                     tools_file: Path) -> None:
    address, gateway = served
    out = invoke(address, "--user", "Weather in Paris?", "--thinking", "--tools", str(tools_file), "--json")
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["token_ids"] for x in lines] == [list(p.encode()) for p in PIECES]
    assert "".join(x.get("reasoning_text", "") for x in lines) == "Need weather."
    assert all(x["reasoning_text"] for x in lines if "reasoning_text" in x)  # absent, never empty
    assert "".join(x["text"] for x in lines) == "Checking Paris."
    assert all("tool_calls" not in x for x in lines[:-1])
    rid = gateway.requests[0].request_id
    assert lines[-1]["request_id"] == rid and lines[-1]["finish_reason"] == "stop"
    assert lines[-1]["tool_calls"] == [{"id": call_id(rid, 0), "name": "get_weather",
                                        "arguments": {"city": "Paris", "days": 2}}]


def test_text_prints_reasoning_dimmed_then_answer_then_calls(served: tuple[str, ScriptedGateway],
                                                              tools_file: Path) -> None:
    address, gateway = served
    args = ("--user", "Weather in Paris?", "--thinking", "--tools", str(tools_file))
    out = invoke(address, *args)
    assert out.exit_code == 0, out.output
    call = f'tool call get_weather {{"city": "Paris", "days": 2}} ({call_id(gateway.requests[0].request_id, 0)})'
    assert out.stdout.splitlines() == ["Need weather.", "", "Checking Paris.", call]
    # On a colour terminal the reasoning, and only it, is dim (SGR 2).
    coloured = invoke(address, *args, env={"FORCE_COLOR": "1", "NO_COLOR": "", "TERM": "xterm"})
    assert coloured.exit_code == 0, coloured.output
    reasoning, answer = coloured.stdout.split("\n\n", 1)
    assert "\x1b[2m" in reasoning and reasoning.replace("\x1b[2m", "").replace("\x1b[0m", "") == "Need weather."
    assert "\x1b[" not in answer


def test_text_is_written_as_the_model_wrote_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_STATE", "/nonexistent/state.json")
    odd = ["[bold]x[/bold]\t:smile:", " a\\b </think> kept"]  # no thinking: </think> is answer text
    with serving(odd) as (address, _):
        out = invoke(address, "--user", "hi", env={"FORCE_COLOR": "1", "NO_COLOR": "", "TERM": "xterm"})
    assert out.exit_code == 0, out.output
    assert out.stdout == "".join(odd) + "\n"


BAD_TOOLS = [  # (file content, what the one-line error must say)
    ("{not json", "not valid JSON"),
    (json.dumps({"type": "function"}), "non-empty JSON array"),
    (json.dumps([TOOLS[0], {"function": TOOLS[0]["function"]}]), "entry 1: type"),
    (json.dumps([{"type": "function", "function": {"name": "get weather"}}]), "entry 0: name: 'get weather'"),
    (json.dumps([{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
     "entry 0: function.parameters"),
    (json.dumps([{"type": "function", "function": {"name": "f", "strict": True}}]), "entry 0: function.strict"),
]


@pytest.mark.parametrize(("content", "says"), BAD_TOOLS)
def test_a_bad_tools_file_names_the_file_and_entry(served: tuple[str, ScriptedGateway], tmp_path: Path,
                                                   content: str, says: str) -> None:
    address, gateway = served
    path = tmp_path / "bad.json"
    path.write_text(content)
    out = invoke(address, "--user", "hi", "--tools", str(path))
    assert out.exit_code == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith(f"error: --tools {path}") and says in out.stderr
    assert gateway.requests == []


BAD_OPTIONS = [  # (arguments, what the one-line error must say)
    (["--message", "hello"], "--message 'hello': expected ROLE:TEXT"),
    (["--message", "robot:hi"], "role 'robot' is not one of"),
    (["--message", "tool:42"], "role 'tool' is not one of"),
    (["--message", "user:hi", "--message", "assistant:ok"], "the last turn must be the user's"),
    (["--system", "be brief"], "the last turn must be the user's"),
    (["--user", "hi", "--reasoning-effort", "extreme"], "--reasoning-effort 'extreme': expected high or max"),
    (["--prompt", "x", "--user", "hi"], "exactly one of --prompt, --token-ids and --message/--system/--user"),
    (["--thinking"], "exactly one of"),
    (["--prompt", "x", "--thinking", "--reasoning-effort", "high"], "--thinking, --reasoning-effort: only with"),
    (["--token-ids", "1,2", "--tools", "/nonexistent/tools.json"], "--tools /nonexistent/tools.json: cannot read"),
]


@pytest.mark.parametrize(("args", "says"), BAD_OPTIONS)
def test_each_bad_option_is_one_line(served: tuple[str, ScriptedGateway], args: list[str], says: str) -> None:
    address, gateway = served
    out = invoke(address, *args)
    assert out.exit_code == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [out.stderr.strip()] and out.stderr.startswith("error: ")
    assert says in out.stderr
    assert gateway.requests == []


def test_make_request_takes_exactly_one_input() -> None:
    turn = [generate_pb2.ChatMessage(role="user", content="hi")]
    with pytest.raises(ValueError, match=r"exactly one of prompt, token_ids and messages, got \['prompt', 'messages'\]"):
        make_request(prompt="x", messages=turn)
    with pytest.raises(ValueError, match="got none"):
        make_request()
    with pytest.raises(ValueError, match="tools: only with messages"):
        make_request(token_ids=[1], tools=[generate_pb2.Tool(name="f")])
    with pytest.raises(ValueError, match="reasoning_effort=max: needs thinking"):
        make_request(messages=turn, reasoning_effort=ReasoningEffort.MAX)
    req = make_request(messages=turn, thinking=True, reasoning_effort=ReasoningEffort.HIGH)
    assert (req.prompt, list(req.token_ids), list(req.messages)) == ("", [], turn)
    assert (req.chat.thinking, req.chat.reasoning_effort) == (True, generate_pb2.REASONING_EFFORT_HIGH)
