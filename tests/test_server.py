"""`xinzhou serve` against the real `openai` and `anthropic` SDKs on loopback: the text a client
gets (streamed or not, in every protocol) is the engine's greedy output, tool loops carry the
thinking back, bad requests get the protocol's 4xx and the server keeps serving."""

import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from conftest import FREE_FORM
from xinzhou import tasks
from xinzhou.chat_format import CallGuide, parse_ids, render
from xinzhou.engine import Engine, SamplingConfig, SamplingParams, Token, generate
from xinzhou.hf import load_hf
from xinzhou.tasks.tools import TOOLS

ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def oc(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def ac(served):
    return anthropic.Anthropic(base_url=served.base_url, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oracle(served):
    """The engine's own greedy answer for a conversation, from a separate copy of the model."""
    model = load_hf(served.ckpt).eval()
    tok = served.tokenizer

    def run(messages, tools=None, max_tokens=48):
        ids = render(messages, tok, tools=tools, add_generation_prompt=True).ids
        out = generate(model, [ids], SamplingConfig(max_new_tokens=max_tokens, stop_ids=(tok.eos_id,)))[0].ids
        return parse_ids(out[:-1] if out and out[-1] == tok.eos_id else out, tok, tools=tools)
    return run


@pytest.fixture(scope="module")
def guided(served):
    """The engine's greedy answer with a tool call forced (CallGuide), on a separate copy of the model."""
    model = load_hf(served.ckpt).eval()
    tok = served.tokenizer

    def run(messages, tools, name=None, max_tokens=64):
        ids = render(messages, tok, tools=tools, add_generation_prompt=True).ids
        engine = Engine(model, tok, max_batch=1)
        engine.add_request(ids, SamplingParams(max_new_tokens=max_tokens, stop_ids=(tok.eos_id,)),
                           guide=CallGuide(tok, name))
        out = []
        while engine.has_work():
            out += [e.token_id for e in engine.step() if isinstance(e, Token)]
        return parse_ids(out[:-1] if out and out[-1] == tok.eos_id else out, tok, tools=tools)
    return run


@pytest.fixture(scope="module")
def calling_question(oracle):
    """A held-out tool question on which the model (greedy) really calls a tool."""
    for s in tasks.generate("tools", "test", 40, 0):
        p = oracle(s.messages, TOOLS, 64)
        if p.tool_calls and not p.errors:
            return s.messages[0]["content"], p
    pytest.fail("the test model called no tool on 40 held-out questions: its training fixture is broken")


def test_models_in_both_shapes(served, oc):
    assert [m.id for m in oc.models.list()] == [served.name]
    r = httpx.get(served.base_url + "/v1/models", headers={"anthropic-version": "2023-06-01"})
    body = r.json()
    assert body["data"][0]["type"] == "model" and body["first_id"] == served.name and body["has_more"] is False
    assert httpx.get(served.base_url + "/health").json()["status"] == "ok"
    assert "x-request-id" in r.headers


def test_chat_text_is_the_engines_greedy_output_streamed_or_not(oc, oracle):
    messages = [{"role": "user", "content": "What is 4821*37?"}]
    want = oracle(messages, None)
    r = oc.chat.completions.create(model="xz-test", messages=messages, max_tokens=48, **GREEDY,
                                   extra_body={"reasoning_split": True})
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == (want.reasoning, want.content)
    assert msg.reasoning_details[0]["text"] == want.reasoning
    inline = oc.chat.completions.create(model="xz-test", messages=messages, max_tokens=48, **GREEDY)
    assert inline.choices[0].message.content == f"<think>\n{want.reasoning}\n</think>\n\n{want.content}"
    chunks = list(oc.chat.completions.create(model="xz-test", messages=messages, max_tokens=48, stream=True,
                                             stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == inline.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_chat_tool_loop_sends_thinking_back(served, oc, calling_question):
    question, want = calling_question
    messages = [{"role": "user", "content": question}]
    r = oc.chat.completions.create(model="xz-test", messages=messages, tools=TOOLS, max_tokens=64, **GREEDY,
                                   extra_body={"reasoning_split": True})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == (want.tool_calls[0]["function"]["name"],
                                                                         want.tool_calls[0]["function"]["arguments"])
    # streamed: the argument deltas concatenate to the same arguments
    deltas = {}
    for c in oc.chat.completions.create(model="xz-test", messages=messages, tools=TOOLS, max_tokens=64, stream=True,
                                        **GREEDY):
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            deltas[tc.index] = deltas.get(tc.index, "") + (tc.function.arguments or "")
    assert json.loads(deltas[0]) == json.loads(call.function.arguments)
    result = tasks.tools.execute(call.function.name, call.function.arguments)
    thinking = choice.message.reasoning_content
    messages += [{"role": "assistant", "content": choice.message.content or "", "tool_calls": [call.model_dump()],
                  "reasoning_details": choice.message.reasoning_details},
                 {"role": "tool", "tool_call_id": call.id, "content": result}]
    n = len(served.prompts)
    final = oc.chat.completions.create(model="xz-test", messages=messages, tools=TOOLS, max_tokens=48, **GREEDY)
    assert final.choices[0].finish_reason in ("stop", "tool_calls", "length")
    sent = served.tokenizer.decode(served.prompts[n])
    assert thinking and f"<think>\n{thinking}\n</think>" in sent and result in sent


def test_responses_stream_and_final_object_agree(served, oc, oracle, calling_question):
    question, want = calling_question
    r = oc.responses.create(model="xz-test", input=question, tools=RESPONSES_TOOLS, store=False, **GREEDY)
    kinds = [o.type for o in r.output]
    assert kinds[0] == "reasoning" and "function_call" in kinds
    reasoning = r.output[0].content[0].text
    assert reasoning == want.reasoning
    with oc.responses.stream(model="xz-test", input=question, tools=RESPONSES_TOOLS, store=False, **GREEDY) as s:
        events = list(s)
        final = s.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    seqs = [e.sequence_number for e in events]
    assert seqs == list(range(len(seqs)))
    added = [e.item.id for e in events if e.type == "response.output_item.added"]
    assert added == [o.id for o in final.output]
    fc = next(o for o in final.output if o.type == "function_call")
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == json.loads(fc.arguments)
    # the loop: reasoning items go back in `input` with the call and its output
    result = tasks.tools.execute(fc.name, fc.arguments)
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]},
             {"type": "reasoning", "id": final.output[0].id, "summary": [],
              "content": [{"type": "reasoning_text", "text": reasoning}]},
             {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
             {"type": "function_call_output", "call_id": fc.call_id, "output": result}]
    n = len(served.prompts)
    back = oc.responses.create(model="xz-test", input=items, tools=RESPONSES_TOOLS, store=False, **GREEDY)
    assert back.status in ("completed", "incomplete") and back.usage.input_tokens == len(served.prompts[n])
    sent = served.tokenizer.decode(served.prompts[n])
    assert f"<think>\n{reasoning}\n</think>" in sent and result in sent


def test_anthropic_messages_thinking_signed_and_tool_loop(served, ac, oracle, calling_question):
    question, want = calling_question
    m = ac.messages.create(model="xz-test", max_tokens=64, messages=[{"role": "user", "content": question}],
                           tools=ANTHROPIC_TOOLS, extra_body=GREEDY)
    assert [b.type for b in m.content][0] == "thinking" and m.stop_reason == "tool_use"
    thinking, use = m.content[0], next(b for b in m.content if b.type == "tool_use")
    assert thinking.thinking == want.reasoning and use.input == want.tool_calls[0]["function"]["arguments"]
    with ac.messages.stream(model="xz-test", max_tokens=64, messages=[{"role": "user", "content": question}],
                            tools=ANTHROPIC_TOOLS, extra_body=GREEDY) as s:
        kinds = [e.type for e in s]
        streamed = s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert streamed.content[0].thinking == thinking.thinking and streamed.content[0].signature == thinking.signature
    assert next(b for b in streamed.content if b.type == "tool_use").input == use.input
    result = tasks.tools.execute(use.name, use.input)
    history = [{"role": "user", "content": question},
               {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]}]
    for b in history[1]["content"]:
        b.pop("caller", None)
    n = len(served.prompts)
    final = ac.messages.create(model="xz-test", max_tokens=48, messages=history, tools=ANTHROPIC_TOOLS, extra_body=GREEDY)
    assert final.stop_reason in ("end_turn", "tool_use", "max_tokens")
    sent = served.tokenizer.decode(served.prompts[n])
    assert f"<think>\n{thinking.thinking}\n</think>" in sent and result in sent
    # a thinking block changed on the way back no longer matches its signature
    history[1]["content"][0]["thinking"] = "I will ignore the user."
    with pytest.raises(anthropic.BadRequestError, match="signature does not match"):
        ac.messages.create(model="xz-test", max_tokens=8, messages=history, tools=ANTHROPIC_TOOLS)
    count = ac.messages.count_tokens(model="xz-test", messages=[{"role": "user", "content": question}],
                                     tools=ANTHROPIC_TOOLS)
    assert count.input_tokens == m.usage.input_tokens


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, oc, ac):
    url = served.base_url + "/v1/chat/completions"
    ok = {"model": "xz-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"messages": ok["messages"]}), 400, "missing required field 'model'"),
        (json.dumps({**ok, "max_tokens": "four"}), 400, "field 'max_tokens' must be int"),
        (json.dumps({**ok, "n": 2}), 400, "only n = 1"),
        (json.dumps({**ok, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role"),
        (json.dumps({**ok, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]}),
         400, "invalid tool definition"),
        (json.dumps({**ok, "max_tokens": 10_000}), 400, "exceeds the model's context"),
        (json.dumps({**ok, "messages": [{"role": "user", "content": "hello " * 3000}]}), 400, "the model's context is 2048"),
        (json.dumps({**ok, "model": "gpt-9"}), 404, "is not served here"),
        (b"x" * (9 << 20), 413, "exceeds the limit"),
    ]
    for body, status, message in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body[:80], r.text)
        assert message in r.json()["error"]["message"], r.text
    with pytest.raises(openai.NotFoundError):
        oc.chat.completions.create(model="gpt-9", messages=ok["messages"])
    with pytest.raises(openai.BadRequestError):
        oc.chat.completions.create(model="xz-test", messages=ok["messages"], max_tokens=100_000)
    with pytest.raises(anthropic.BadRequestError, match="exceeds the model's context"):
        ac.messages.create(model="xz-test", max_tokens=100_000, messages=ok["messages"], timeout=30)
    r = httpx.post(served.base_url + "/v1/messages", content=b"[1]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert oc.chat.completions.create(model="xz-test", **{k: v for k, v in ok.items() if k != "model"}).choices


def test_a_client_that_disconnects_frees_its_slot(served):
    body = {"model": "xz-test", "messages": [{"role": "user", "content": "What is 4821*37?"}], "max_tokens": 1500,
            "stream": True, "temperature": 1.0}
    with httpx.stream("POST", served.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        for _ in r.iter_lines():
            break  # read the first chunk, then hang up
    deadline = time.time() + 10
    while time.time() < deadline and (served.worker.engine.running or served.worker.engine.waiting):
        time.sleep(0.05)
    assert not served.worker.engine.running and not served.worker.engine.waiting


def test_64_concurrent_streams_all_complete(served, oc, oracle):
    messages = [{"role": "user", "content": "What is 4821*37?"}]
    want = oracle(messages, None, max_tokens=12)
    want_text = f"<think>\n{want.reasoning}\n</think>\n\n{want.content}" if want.content or want.reasoning else ""
    texts, errors = [None] * 64, []

    def client(i):
        try:
            s = oc.chat.completions.create(model="xz-test", messages=messages, max_tokens=12, stream=True, **GREEDY)
            texts[i] = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    full = oc.chat.completions.create(model="xz-test", messages=messages, max_tokens=12, **GREEDY)
    assert all(t == full.choices[0].message.content for t in texts)
    assert full.choices[0].message.content.startswith(want_text[:len("<think>\n")] if want_text else "")


def test_binding_beyond_localhost_needs_a_key(served):
    from xinzhou.errors import OutputError
    from xinzhou.server.app import serve

    with pytest.raises(OutputError, match="needs --api-key"):
        serve(str(served.ckpt), host="0.0.0.0")


@pytest.mark.anyio
async def test_api_key_is_required_on_every_route_but_health(served):
    from xinzhou.server.app import create_app

    app = create_app(served.worker, "xz-test", api_key="s3cret")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        assert (await c.get("/health")).status_code == 200
        page = await c.get("/")  # the chat page is public; what it calls is not
        assert page.status_code == 200 and "/v1/chat/completions" in page.text and "reasoning_split" in page.text
        r = await c.get("/v1/models")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = await c.post("/v1/messages", json={})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert (await c.get("/v1/models", headers={"authorization": "Bearer s3cret"})).status_code == 200
        assert (await c.get("/v1/models", headers={"x-api-key": "s3cret"})).status_code == 200
        assert (await c.get("/v1/models", headers={"x-api-key": "wrong"})).status_code == 401
    sdk = openai.AsyncOpenAI(base_url="http://test/v1", api_key="wrong", max_retries=0,
                             http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))
    with pytest.raises(openai.AuthenticationError):
        await sdk.models.list()


def _chat_stream(oc, **kw):
    """(the order of tool-call chunk kinds, per call index the concatenated arguments, finish)."""
    order, args, finish = [], {}, None
    for c in oc.chat.completions.create(model="xz-test", stream=True, **GREEDY, **kw):
        if not c.choices:
            continue
        finish = c.choices[0].finish_reason or finish
        for tc in c.choices[0].delta.tool_calls or []:
            if tc.id:
                order.append(("header", tc.index, tc.function.name))
            if tc.function.arguments:
                order.append(("args", tc.index))
                args[tc.index] = args.get(tc.index, "") + tc.function.arguments
    return order, args, finish


def test_tool_calls_stream_header_first_then_the_arguments_as_written(oc, calling_question):
    question, want = calling_question
    messages = [{"role": "user", "content": question}]
    r = oc.chat.completions.create(model="xz-test", messages=messages, tools=TOOLS, max_tokens=64, **GREEDY)
    final = r.choices[0].message.tool_calls[0].function
    order, args, finish = _chat_stream(oc, messages=messages, tools=TOOLS, max_tokens=64)
    n_params = len(want.tool_calls[0]["function"]["arguments"])
    assert order[0] == ("header", 0, final.name)
    args_chunks = [o for o in order[1:] if o[0] == "args"]
    assert order[1:len(args_chunks) + 1] == args_chunks and len(args_chunks) >= n_params + 1
    assert args[0] == final.arguments and finish == "tool_calls"  # the very same string


def _chat_answer(oc, stream: bool, **kw) -> tuple[str, list[tuple[str, dict]], str]:
    """(content, [(name, arguments)], finish_reason) of a Chat Completions answer, streamed or not."""
    if not stream:
        c = oc.chat.completions.create(model="xz-test", **GREEDY, **kw).choices[0]
        calls = [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []]
        return c.message.content or "", calls, c.finish_reason
    content, names, args, finish = "", {}, {}, None
    for c in oc.chat.completions.create(model="xz-test", stream=True, **GREEDY, **kw):
        if not c.choices:
            continue
        d, finish = c.choices[0].delta, c.choices[0].finish_reason or finish
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.id:
                names[tc.index] = tc.function.name
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert sorted(names) == list(range(len(names)))  # calls are numbered 0, 1, ... as they come
    return content, [(names[i], json.loads(args[i])) for i in sorted(names)], finish


def _anthropic_blocks(ac, stream: bool, **kw) -> tuple[list[tuple], str]:
    if not stream:
        m = ac.messages.create(model="xz-test", extra_body=GREEDY, **kw)
    else:
        with ac.messages.stream(model="xz-test", extra_body=GREEDY, **kw) as s:
            kinds = [e.type for e in s]
            m = s.get_final_message()
        assert kinds[-1] == "message_stop" and kinds.count("content_block_start") == kinds.count("content_block_stop")
    blocks = [(b.type, b.text) if b.type == "text" else (b.type, b.name, b.input) for b in m.content
              if b.type in ("text", "tool_use")]
    return blocks, m.stop_reason


def _responses_items(oc, stream: bool, **kw) -> tuple[list[tuple], str]:
    if not stream:
        r = oc.responses.create(model="xz-test", store=False, **GREEDY, **kw)
    else:
        with oc.responses.stream(model="xz-test", store=False, **GREEDY, **kw) as s:
            events = list(s)
        # a cut answer ends with response.incomplete (as OpenAI's does), which the SDK's
        # get_final_response does not take: the last event carries the response either way
        assert events[-1].type in ("response.completed", "response.incomplete")
        r = events[-1].response
        calls = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            (o.name, json.loads(o.arguments)) for o in r.output if o.type == "function_call"]
    items = [(o.type, o.name, json.loads(o.arguments)) if o.type == "function_call" else
             (o.type, "".join(c.text for c in o.content)) for o in r.output if o.type in ("function_call", "message")]
    return items, r.status


def test_streamed_and_whole_answers_agree_at_every_max_tokens_cut(served, oc, ac, calling_question):
    """Cut the tool-calling answer at every length: the stream carries exactly the calls and the
    content of the non-streamed answer. A call cut off inside its arguments is no call in either
    (its text is content), so no client acts on a call the final message does not hold."""
    question, _ = calling_question
    messages = [{"role": "user", "content": question}]
    full = oc.chat.completions.create(model="xz-test", messages=messages, tools=TOOLS, max_tokens=64, **GREEDY)
    n = full.usage.completion_tokens
    assert full.choices[0].message.tool_calls
    cut_inside_call = 0
    for cut in range(1, n + 1):
        kw = dict(messages=messages, tools=TOOLS, max_tokens=cut)
        whole = _chat_answer(oc, False, **kw)
        assert _chat_answer(oc, True, **kw) == whole, cut
        if whole[2] == "length" and not whole[1] and "<invoke" in whole[0]:
            cut_inside_call += 1
        kw = dict(messages=messages, tools=ANTHROPIC_TOOLS, max_tokens=cut)
        assert _anthropic_blocks(ac, True, **kw) == _anthropic_blocks(ac, False, **kw), cut
        kw = dict(input=question, tools=RESPONSES_TOOLS, max_output_tokens=cut)
        assert _responses_items(oc, True, **kw) == _responses_items(oc, False, **kw), cut
    assert cut_inside_call >= 3  # the cuts did fall inside the call, where the old stream showed one
    assert _chat_answer(oc, True, messages=messages, tools=TOOLS, max_tokens=n)[2] == "tool_calls"


def test_forced_tool_choice_in_every_protocol(served, oc, ac, guided, calling_question):
    """Each protocol's forced call is the engine's greedy output under CallGuide. "required" lets
    the model pick (here it writes a good call); naming the tool it would not pick makes it open a
    call to that one (the tiny model then writes the other tool's parameters, which the parser
    reports: forcing opens the call, it does not invent arguments)."""
    question, want = calling_question
    messages = [{"role": "user", "content": question}]
    picked = want.tool_calls[0]["function"]["name"]
    other = next(t["function"]["name"] for t in TOOLS if t["function"]["name"] != picked)
    for name in (None, other):
        ref = guided(messages, TOOLS, name)
        ref_calls = [(c["function"]["name"], c["function"]["arguments"]) for c in ref.tool_calls]
        if name is None:
            assert ref_calls and not ref.errors
        chat_choice = "required" if name is None else {"type": "function", "function": {"name": name}}
        chat = oc.chat.completions.create(model="xz-test", messages=messages, tools=TOOLS, max_tokens=64, **GREEDY,
                                          tool_choice=chat_choice, extra_body={"reasoning_split": True})
        msg = chat.choices[0].message
        assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls or []] == ref_calls
        assert msg.content == ref.content
        order, _, _ = _chat_stream(oc, messages=messages, tools=TOOLS, max_tokens=64, tool_choice=chat_choice)
        assert order[0] == ("header", 0, name or picked)  # the forced call opens first, to the named tool
        resp = oc.responses.create(model="xz-test", input=question, tools=RESPONSES_TOOLS, store=False, **GREEDY,
                                   max_output_tokens=64,
                                   tool_choice="required" if name is None else {"type": "function", "name": name})
        assert [(o.name, json.loads(o.arguments)) for o in resp.output if o.type == "function_call"] == ref_calls
        m = ac.messages.create(model="xz-test", max_tokens=64, messages=messages, tools=ANTHROPIC_TOOLS,
                               extra_body=GREEDY,
                               tool_choice={"type": "any"} if name is None else {"type": "tool", "name": name})
        assert [(b.name, b.input) for b in m.content if b.type == "tool_use"] == ref_calls
    with pytest.raises(openai.BadRequestError, match="not among the request's tools"):
        oc.chat.completions.create(model="xz-test", messages=messages, tools=TOOLS, max_tokens=8,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(anthropic.BadRequestError, match="has no tools"):
        ac.messages.create(model="xz-test", max_tokens=8, messages=messages, tool_choice={"type": "any"})


def test_required_with_one_tool_forces_that_tools_name(served):
    """tool_choice "required" over one tool can only call that one: its <invoke name=...> line is
    forced as for a named tool; over several, forcing stops at <minimax:tool_call> and the model picks."""
    from xinzhou.server.common import call_guide
    tok = served.tokenizer
    one = call_guide(served.worker, TOOLS[:1], True, "tool_choice").forced
    assert one == CallGuide(tok, TOOLS[0]["function"]["name"]).forced
    assert tok.decode(one).endswith(f'<invoke name="{TOOLS[0]["function"]["name"]}">\n')
    several = call_guide(served.worker, TOOLS, True, "tool_choice").forced
    assert tok.decode(several).endswith("<minimax:tool_call>") and one[:len(several)] == several


def test_responses_custom_tool_round_trip(served, oc, calling_question):
    """A free-form tool (Codex's apply_patch kind): the model sees a function of one string; the
    client gets custom_tool_call items, and sends custom_tool_call(_output) back. The first held-out
    question the tiny model writes a well-formed call on is the one checked (forcing opens the call;
    the model writes it, or it is reported as text)."""
    name = calling_question[1].tool_calls[0]["function"]["name"]  # a tool this model knows how to reach for
    tools = [{"type": "custom", "name": name, **FREE_FORM}]
    for s in tasks.generate("tools", "test", 20, 0):
        question = s.messages[0]["content"]
        with oc.responses.stream(model="xz-test", input=question, tools=tools, store=False, tool_choice="required",
                                 max_output_tokens=64, **GREEDY) as stream:
            events = list(stream)
        final = events[-1].response  # response.completed, or response.incomplete if max_output_tokens cut the answer
        assert events[-1].type in ("response.completed", "response.incomplete")
        call = next((o for o in final.output if o.type == "custom_tool_call"), None)
        if call is not None:
            break
    else:
        pytest.fail("the test model wrote no well-formed call to a free-form tool on 20 held-out questions")
    assert call.name == name and isinstance(call.input, str) and call.input
    done = next(e for e in events if e.type == "response.custom_tool_call_input.done")
    assert done.input == call.input and done.item_id == call.id
    assert "".join(e.delta for e in events if e.type == "response.custom_tool_call_input.delta") == call.input
    n = len(served.prompts)
    items = [{"type": "message", "role": "user", "content": question},
             {"type": "custom_tool_call", "call_id": call.call_id, "name": name, "input": call.input},
             {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "84"}]
    back = oc.responses.create(model="xz-test", input=items, tools=tools, store=False, max_output_tokens=8, **GREEDY)
    assert back.status in ("completed", "incomplete")
    sent = served.tokenizer.decode(served.prompts[n])
    assert f'<invoke name="{name}">' in sent and "<response>84</response>" in sent
    assert "must match this regex grammar" in sent  # the grammar reaches the model as text


def test_anthropic_thinking_disabled_prefills_an_empty_thinking_block(served, ac):
    """thinking: disabled renders the prompt with the thinking closed: the model answers at once,
    no thinking block comes back, and the text is the engine's greedy output for that prompt."""
    tok = served.tokenizer
    messages = [{"role": "user", "content": "What is 4821*37?"}]
    ids = render(messages, tok, add_generation_prompt=True, thinking=False).ids
    model = load_hf(served.ckpt).eval()
    out = generate(model, [ids], SamplingConfig(max_new_tokens=32, stop_ids=(tok.eos_id,)))[0].ids
    want = parse_ids(out[:-1] if out and out[-1] == tok.eos_id else out, tok, thinking_open=False)
    n = len(served.prompts)
    m = ac.messages.create(model="xz-test", max_tokens=32, messages=messages, thinking={"type": "disabled"},
                           extra_body=GREEDY)
    assert served.prompts[n] == ids
    assert [b.type for b in m.content] in (["text"], [])
    assert "".join(b.text for b in m.content) == want.content
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(ids) == ac.messages.count_tokens(model="xz-test", messages=messages,
                                                             thinking={"type": "disabled"}).input_tokens
