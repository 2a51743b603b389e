"""The agent loop against a real `xinzhou serve` on loopback, in all three protocols: a tool task
goes call -> result -> answer, and the model's thinking is sent back at every step (asserted on the
prompts the server received); with keep_thinking=False it is not."""

import pytest

from xinzhou import tasks
from xinzhou.agent import loop
from xinzhou.agent.client import PROTOCOLS, make_client
from xinzhou.agent.tools import GetPrice, TaskCalculator
from xinzhou.tasks.tools import PRICES

TOOLS = {t.name: t for t in (TaskCalculator(), GetPrice(PRICES))}


@pytest.fixture(scope="module")
def question(served):
    client = make_client("openai", served.base_url, served.name, temperature=0.0, max_tokens=64)
    for s in tasks.generate("tools", "test", 40, 0):
        turn = client.complete([s.messages[0]["content"]], [t.spec() for t in TOOLS.values()])
        if turn.tool_calls and turn.reasoning:
            return s.messages[0]["content"]
    pytest.fail("the test model called no tool on 40 held-out questions")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tool_task_with_thinking_sent_back(served, question, protocol):
    client = make_client(protocol, served.base_url, served.name, temperature=0.0, max_tokens=64)
    n = len(served.prompts)
    events = list(loop.run(client, question, TOOLS, max_steps=3))
    kinds = [type(e).__name__ for e in events]
    assert "ToolCallEvent" in kinds and "ToolResultEvent" in kinds, kinds
    thoughts = [e.text for e in events if isinstance(e, loop.Thinking)]
    results = [e for e in events if isinstance(e, loop.ToolResultEvent)]
    assert results[0].ok and results[0].content.lstrip("-").isdigit()  # the real tool ran
    assert isinstance(events[-1], (loop.Final, loop.Error))
    prompts = [served.tokenizer.decode(p) for p in served.prompts[n:]]
    assert len(prompts) >= 2  # the call, then the turn after its result
    assert f"<think>\n{thoughts[0]}\n</think>" in prompts[1] and results[0].content in prompts[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dropping_thinking_leaves_it_out_of_the_prompt(served, question, protocol):
    client = make_client(protocol, served.base_url, served.name, temperature=0.0, max_tokens=64, keep_thinking=False)
    n = len(served.prompts)
    events = list(loop.run(client, question, TOOLS, max_steps=2))
    thoughts = [e.text for e in events if isinstance(e, loop.Thinking)]
    prompts = [served.tokenizer.decode(p) for p in served.prompts[n:]]
    assert len(prompts) >= 2 and thoughts and f"{thoughts[0]}\n</think>" not in prompts[1]


def test_endpoint_failure_is_an_event(served):
    client = make_client("openai", served.base_url, "no-such-model", max_tokens=8)
    events = list(loop.run(client, "hi", TOOLS))
    assert len(events) == 1 and isinstance(events[0], loop.Error) and "404" in events[0].message


@pytest.mark.parametrize("source", ["model", "endpoint"])
def test_terminal_chat_prints_the_greedy_reply(served, source):
    import subprocess
    import sys

    from xinzhou.chat_format import parse_ids, render
    from xinzhou.engine import SamplingConfig, generate
    from xinzhou.hf import load_hf

    tok = served.tokenizer
    ids = render([{"role": "user", "content": "What is 4821*37?"}], tok, add_generation_prompt=True).ids
    out = generate(load_hf(served.ckpt), [ids], SamplingConfig(max_new_tokens=40, stop_ids=(tok.eos_id,)))[0].ids
    want = parse_ids(out[:-1] if out[-1] == tok.eos_id else out, tok)
    where = ["--model", str(served.ckpt)] if source == "model" else ["--endpoint", served.base_url, "--served-name",
                                                                       served.name]
    r = subprocess.run([sys.executable, "-m", "xinzhou.cli", "chat", *where, "--temperature", "0", "--max-tokens", "40"],
                       input="What is 4821*37?\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert want.reasoning in r.stdout and r.stdout.rstrip().endswith(want.content.rstrip() + "\nyou>")


def test_eval_through_an_endpoint_equals_eval_of_the_checkpoint(served, tmp_path, capsys):
    """`xinzhou eval --endpoint` (the served checkpoint, greedy, every level; L4 through the agent
    loop over HTTP) gives the level table `xinzhou eval --model` gives, and --compare says so."""
    import json

    from xinzhou.cli import main

    main(["eval", "--model", str(served.ckpt), "--out", str(tmp_path / "local"), "-n", "8"])
    local = json.loads((tmp_path / "local" / "levels.json").read_text())
    n = len(served.prompts)
    main(["eval", "--endpoint", served.base_url, "--served-name", served.name, "--out", str(tmp_path / "remote"),
          "-n", "8", "--compare", str(tmp_path / "local" / "levels.json")])
    remote = json.loads((tmp_path / "remote" / "levels.json").read_text())
    assert remote == local
    l4 = next(x for x in local if x["level"] == 4)
    assert l4["details"]["well-formed call"] > 0  # the tool loop really ran, through the server
    assert len(served.prompts) - n > 5 * 8  # every level's samples, and L4's turns after a tool result
    report = (tmp_path / "remote" / "report.md").read_text()
    assert f"Endpoint `{served.base_url}`" in report and report.count("| +0.0% |") == 5
    assert (tmp_path / "remote" / "levels.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "Change from" in out
