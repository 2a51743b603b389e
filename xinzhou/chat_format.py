"""MiniMax-M2 chat format: messages -> token ids + loss mask, and model output -> message.

The only module that knows the M2 markup. Rendering:

    ]~!b[]~b]system\n{system}{tools section}[e~[\n
    ]~b]user\n{text}[e~[\n
    ]~b]ai\n<think>\n{reasoning}\n</think>\n\n{content}\n<minimax:tool_call>\n
    <invoke name="f">\n<parameter name="k">v</parameter>\n</invoke>\n</minimax:tool_call>[e~[\n
    ]~b]tool\n<response>{result}</response>\n<response>{result}</response>[e~[\n
    ]~b]ai\n<think>\n                                     (generation prompt)
    ]~b]ai\n<think>\n\n</think>\n\n                       (generation prompt, thinking=False)

Messages are OpenAI-style dicts (system/user/assistant/tool; `reasoning_content` or inline
`<think>...</think>` in content, `tool_calls` with dict or JSON-string arguments; `tool_call_id`
is accepted but not rendered: M2 pairs results with calls by order; a tool result given as a list
of text parts is one `<response>` per part, as M2's template renders it). As in M2's own template, a
"\n" separates the content from `<minimax:tool_call>`. Markers are inserted as special-token ids;
every text piece goes through `Tokenizer.encode`, which never yields a special id, so user text
spelling `<think>` stays text. Thinking is kept only for assistant messages after the last user
message; such a message with no reasoning gets an empty `<think>\n\n</think>\n\n` (M2's template
writes none) so that the generation prompt is a prefix of every trained turn. `loss_mask` is 1 on
what the model produces in those turns (from `<think>` through `[e~[`); older turns are history,
rendered without thinking and not trained, unless `keep_all_thinking=True` renders (and trains)
every assistant turn as it was generated.

Structure comes only from special-token ids. The one place where text markers are read is an
assistant message sent back by a client without `reasoning_content`: MiniMax's API returns
thinking inline in `content` (`<think>...</think>answer`) and clients send that content back, so
it is split as M2's template splits it: reasoning is the text before the first spelled `</think>`
(after any `<think>`), content the text after the last. This only moves text between the
reasoning and the content of that turn (both are encoded as text, never as special ids); a
reasoning or answer that itself spells `</think>` cannot be recovered from the inline form, which
is why clients that need it exact send `reasoning_content`.

Parsing (`StreamParser`, `parse_ids`) reads the ids generated after the generation prompt. Only
the tokenizer's marker ids (`Tokenizer.special_ids`) are structure (any other added token of a
real MiniMax file reads as its text, as `Tokenizer.decode` gives it): text tokens that spell `</think>`, `[e~[` or
`<minimax:tool_call>` (a model echoing a hostile tool result) stay text in the reasoning, the
content and argument values. Inside a block opened by the `<minimax:tool_call>` token, the
`<invoke name=...>` / `<parameter name=...>` XML is ordinary text, parsed from text; the block
closes only at the `</minimax:tool_call>` token. Output starts inside the thinking
(`thinking_open=True`; an opening `<think>` token is also accepted) or, with
`thinking_open=False`, in the content. `parse_ids` is the streaming parser fed all ids at once,
and the parser's result does not depend on how ids or text are split into feeds. Decisions, in
order of precedence:
- `[e~[` or `]~b]` (or a stray `]~!b[` / `<pad>`) ends the output; anything after is ignored.
- Everything before the first `</think>` is reasoning, tool-call XML included (never executed);
  with no `</think>` at all (truncated thinking) everything is reasoning and content is empty.
- A special token with no meaning where it appears (`<minimax:tool_call>` inside the thinking,
  `</think>` after it) reads as its spelling.
- The template's separators are removed exactly: one "\n" after `<think>` and before
  `</think>`, up to two after `</think>`, one before `<minimax:tool_call>`.
- A parameter value ends at a `</parameter>` followed (after whitespace) by `<parameter name=`,
  `</invoke>` or the `</minimax:tool_call>` token, so a literal `</parameter>` (or a spelled
  `</minimax:tool_call>`) inside a string survives.
- Values are converted with the tool's JSON schema (strings raw, everything else JSON); a
  parameter the schema does not describe, or any parameter when `tools` is None, stays a string.
- A call streams as it is generated: `ToolCallStart` once its `<invoke name=...>` tag has parsed
  (for a tool in `tools`), then `ToolCallArgs` JSON pieces: a string-valued parameter's text as
  it comes (held back only where it could still be the closing tag or the stripped newline),
  any other parameter whole when its value completes, the closing brace, then `ToolCallEnd`
  with the typed arguments.
- Failures never raise: a call to a tool not in `tools`, an unterminated or malformed call, or a
  parameter given twice is reported as a `ToolCallError` event (`ParsedMessage.errors`), dropped from `tool_calls`, and
  its raw text is given back as content.
Text is decoded with `tokenizer.IncrementalDecoder`, so a character split across tokens is never
broken. `parse_markup` parses text in which every marker spelling is structure: for hand-written
examples and tests only, never for model output.

    from xinzhou.chat_format import render, parse_ids, StreamParser
    r = render(messages, tok, tools=tools, add_generation_prompt=True)   # r.ids, r.loss_mask
    msg = parse_ids(generated_ids, tok, tools=tools)                     # .reasoning/.content/...
    p = StreamParser(tools, tokenizer=tok)                               # while generating:
    events = p.feed_ids([token_id])   # per new token: ReasoningDelta, ContentDelta, ToolCall*
    events = p.finish()               # at the end: what was held back, unterminated calls

Tests: `python -m pytest tests/test_chat_format.py -q`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xinzhou.schema import function_of, properties_by_tool, value_from_text
from xinzhou.tokenizer import (
    BOS,
    EOS,
    PAD,
    ROLE,
    SPECIAL_TOKENS,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    IncrementalDecoder,
    Tokenizer,
)

Message = Mapping[str, Any]
Tool = Mapping[str, Any]

DEFAULT_SYSTEM = "You are a helpful assistant."
_TOOLS_INTRO = (
    "\n\n# Tools\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n"
)
_TOOLS_OUTRO = (
    "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n"
)
_CALL_EXAMPLE = (
    '\n<invoke name="tool-name-1">\n'
    '<parameter name="param-key-1">param-value-1</parameter>\n'
    '<parameter name="param-key-2">param-value-2</parameter>\n'
    "...\n</invoke>\n"
)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    ids: list[int]
    loss_mask: list[int]  # 1 where the model is trained to produce the token


@dataclass(frozen=True)
class _Piece:
    text: str
    special: bool
    train: int


def render(
    messages: Sequence[Message],
    tokenizer: Tokenizer,
    tools: Sequence[Tool] | None = None,
    add_generation_prompt: bool = False,
    keep_all_thinking: bool = False,
    thinking: bool = True,
) -> Rendered:
    """Token ids and loss mask of a conversation in the M2 format. thinking=False ends the
    generation prompt with an empty, closed thinking block (parse the output with
    thinking_open=False): the model answers without thinking."""
    pieces = _pieces(messages, tools, add_generation_prompt, keep_all_thinking, thinking)
    encoded = iter(tokenizer.encode_batch([p.text for p in pieces if not p.special]))
    ids: list[int] = []
    mask: list[int] = []
    for p in pieces:
        piece_ids = [tokenizer.special_id(p.text)] if p.special else next(encoded)
        ids += piece_ids
        mask += [p.train] * len(piece_ids)
    return Rendered(ids=ids, loss_mask=mask)


def render_text(
    messages: Sequence[Message],
    tools: Sequence[Tool] | None = None,
    add_generation_prompt: bool = False,
    keep_all_thinking: bool = False,
    thinking: bool = True,
) -> str:
    """The rendered conversation as text (markers spelled out); for debugging and tests."""
    return "".join(p.text for p in _pieces(messages, tools, add_generation_prompt, keep_all_thinking, thinking))


def _pieces(
    messages: Sequence[Message], tools: Sequence[Tool] | None, add_generation_prompt: bool,
    keep_all_thinking: bool = False, thinking: bool = True,
) -> list[_Piece]:
    out: list[_Piece] = []

    def text(s: str, train: int = 0) -> None:
        if s:
            out.append(_Piece(s, False, train))

    def special(token: str, train: int = 0) -> None:
        out.append(_Piece(token, True, train))

    msgs = list(messages)
    system = DEFAULT_SYSTEM
    if msgs and msgs[0].get("role") == "system":
        system = _text(msgs[0].get("content"), "messages[0].content") or DEFAULT_SYSTEM
        msgs = msgs[1:]
    offset = len(messages) - len(msgs)  # for error messages that name the caller's index

    special(BOS)
    special(ROLE)
    if tools:
        listed = "".join(f"<tool>{json.dumps(function_of(t, i), ensure_ascii=False)}</tool>\n"
                         for i, t in enumerate(tools))
        text("system\n" + system + _TOOLS_INTRO + listed + _TOOLS_OUTRO)
        special(TOOL_CALL_OPEN)
        text(_CALL_EXAMPLE)
        special(TOOL_CALL_CLOSE)
    else:
        text("system\n" + system)
    special(EOS)
    text("\n")

    last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
    for i, m in enumerate(msgs):
        role = m.get("role")
        where = f"messages[{i + offset}]"
        if role == "user":
            special(ROLE)
            text("user\n" + _text(m.get("content"), f"{where}.content"))
            special(EOS)
            text("\n")
        elif role == "assistant":
            reasoning, content = _reasoning_and_content(m, where)
            calls = m.get("tool_calls") or []
            special(ROLE)
            text("ai\n")
            # Turns after the last user message keep their thinking (an empty block when there is
            # none, unlike M2's template, because the generation prompt ends with "<think>\n" and
            # every trained turn must start the way generation does). Older turns are history:
            # thinking dropped and not trained, unless keep_all_thinking renders every turn as it
            # was generated (SFT conversations with several questions).
            think = i > last_user or keep_all_thinking
            train = 1 if think else 0
            if think:
                special(THINK_OPEN, 1)
                text("\n", 1)  # its own piece: the generation prompt ends with this token
                text(reasoning + "\n", 1)
                special(THINK_CLOSE, 1)
                content = "\n\n" + content
            if calls:
                text(content + "\n", train)
                special(TOOL_CALL_OPEN, train)
                text("\n" + "".join(_invoke(c, f"{where}.tool_calls[{j}]")
                                    for j, c in enumerate(calls)), train)
                special(TOOL_CALL_CLOSE, train)
            else:
                text(content, train)
            special(EOS, train)
            text("\n")
        elif role == "tool":
            prev = msgs[i - 1] if i > 0 else {}
            if prev.get("role") == "tool":
                continue  # rendered with the first result of its run: one turn for all
            if prev.get("role") != "assistant" or not prev.get("tool_calls"):
                raise ValueError(f"{where}: a tool message must follow an assistant message "
                                 "with tool_calls (or another tool message)")
            results = []
            for j in range(i, len(msgs)):
                if msgs[j].get("role") != "tool":
                    break
                content, where_j = msgs[j].get("content"), f"messages[{j + offset}].content"
                # a list of text parts is one response per part, as M2's template renders it
                parts = ([_text([p], where_j) for p in content] if isinstance(content, list) and content
                         else [_text(content, where_j)])
                results += [f"\n<response>{part}</response>" for part in parts]
            special(ROLE)
            text("tool" + "".join(results))
            special(EOS)
            text("\n")
        elif role == "system":
            raise ValueError(f"{where}: a system message is only allowed as the first message")
        else:
            raise ValueError(f"{where}.role: expected system, user, assistant or tool, "
                             f"got {role!r}")
    if add_generation_prompt:
        special(ROLE)
        text("ai\n")
        special(THINK_OPEN)
        text("\n")
        if not thinking:  # an empty thinking block, prefilled: the model answers at once
            text("\n")
            special(THINK_CLOSE)
            text("\n\n")
    return out


def _text(content: Any, where: str) -> str:
    """Message content as a string: str, None, or a list of OpenAI text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise ValueError(f"{where}: only text parts are supported, got {part!r}")
        return "".join(parts)
    raise ValueError(f"{where}: expected a string or a list of text parts, got {type(content)}")


def _reasoning_and_content(m: Message, where: str) -> tuple[str, str]:
    content = _text(m.get("content"), f"{where}.content")
    reasoning = m.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    # Thinking sent back inline, as `<think>...</think>` in content (the module docstring says
    # why this is the one place text markers are read): split as M2's own template does.
    if THINK_CLOSE in content:
        parts = content.split(THINK_CLOSE)
        return parts[0].strip("\n").split(THINK_OPEN)[-1].strip("\n"), parts[-1].strip("\n")
    return "", content


def _invoke(call: Mapping[str, Any], where: str) -> str:
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str):
        raise ValueError(f"{where}: a tool call needs function.name, got {call!r}")
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments: not valid JSON ({e})") from e
    if not isinstance(args, Mapping):
        raise ValueError(f"{where}.function.arguments: expected a JSON object, got {args!r}")
    params = "".join(f'<parameter name="{k}">{_value_text(v)}</parameter>\n'
                     for k, v in args.items())
    return f'<invoke name="{name}">\n{params}</invoke>\n'


def _value_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


class CallGuide:
    """Makes generation call a tool (tool_choice "required", or one named function): the engine
    asks it before each token (`Engine.add_request(..., guide=CallGuide(tok, name))`).

    While the model thinks, the end of the turn is banned, so it has to close its thinking; right
    after `</think>` the guide forces the tokens the chat format writes before a call with no
    content: the separators, `<minimax:tool_call>` and, for a named function, its `<invoke
    name="...">` line. The model writes the parameters; the end of the turn stays banned until
    `</minimax:tool_call>`. The arguments are not constrained: the parser checks the call as any
    other, so a model that writes a malformed call still gets it reported, never invented.
    """

    def __init__(self, tokenizer: Tokenizer, name: str | None = None) -> None:
        self._think_close = tokenizer.special_id(THINK_CLOSE)
        self._call_close = tokenizer.special_id(TOOL_CALL_CLOSE)
        self._ends = tuple(tokenizer.special_id(m) for m in sorted(_END_MARKERS))
        self.forced = self._prefix(tokenizer, name)

    @staticmethod
    def _prefix(tok: Tokenizer, name: str | None) -> list[int]:
        """The ids a rendered call turn has after `</think>`, up to where the model takes over."""
        def after_think(args: dict[str, Any]) -> list[int]:
            call = {"type": "function", "function": {"name": name or "f", "arguments": args}}
            ids = render([{"role": "user", "content": "q"},
                          {"role": "assistant", "content": "", "reasoning_content": "", "tool_calls": [call]}],
                         tok).ids
            return ids[ids.index(tok.special_id(THINK_CLOSE)) + 1:]
        a, b = after_think({}), after_think({"k": "v"})
        n = 0  # the common prefix: tokens that do not depend on what the model writes next
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        ids = a[:n]
        if name is None:  # up to and including <minimax:tool_call>: the model picks the tool
            ids = ids[: ids.index(tok.special_id(TOOL_CALL_OPEN)) + 1]
        return ids

    def __call__(self, output: Sequence[int]) -> tuple[int | None, tuple[int, ...]]:
        """(the token to force, or None; the ids banned) for the next token after `output`."""
        if self._think_close not in output:
            return None, self._ends
        start = output.index(self._think_close) + 1  # where the forced ids begin
        k = len(output) - start
        if k < len(self.forced):
            return self.forced[k], ()
        return None, (() if self._call_close in output[start + len(self.forced):] else self._ends)


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int  # counts started calls, in order
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """A piece of the started call's arguments as JSON text: a string value's text as it comes,
    any other value whole when it completes, then the closing brace (also when the call fails, so
    what was streamed is always a JSON object). The pieces of a call that ends concatenate to
    json.dumps(arguments, ensure_ascii=False)."""
    index: int
    delta: str
    param: str | None = None  # with `text`: the string parameter this piece of its value belongs to
    text: str | None = None  # that piece of the value as text (the delta JSON-escapes it)


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    index: int | None  # the started call this cancels, or None if none had started
    message: str


Event = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgs | ToolCallEnd | ToolCallError


@dataclass
class ParsedMessage:
    reasoning: str = ""
    content: str = ""
    # OpenAI shape; `arguments` is a dict (servers json.dumps it)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """An assistant message that `render` accepts (for the next turn)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


# End the output: `[e~[` and `]~b]` close the turn; `]~!b[` and `<pad>` have no place in one.
_END_MARKERS = frozenset({EOS, ROLE, BOS, PAD})
_PARAM_CLOSE = "</parameter>"
_INVOKE_CLOSE = "</invoke>"
# What may follow a value's "</parameter>" (after whitespace) as text; the TOOL_CALL_CLOSE token
# may follow too. A spelled "</minimax:tool_call>" is not here: it is part of the value.
_AFTER_PARAM = ('<parameter name=', _INVOKE_CLOSE)
_LOOKAHEAD = max(map(len, _AFTER_PARAM))
_SPACES = re.compile(r"\s*")
_MAX_TAG = 1024  # an `<invoke ...>` / `<parameter ...>` tag longer than this is malformed
_NAME = r"""\s+name\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))\s*>"""
_INVOKE_RE = re.compile("<invoke" + _NAME)
_PARAM_RE = re.compile("<parameter" + _NAME)
_MARKUP_RE = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


class StreamParser:
    """Incremental parser of assistant output: `feed_ids` as tokens are generated, then `finish`.

    `feed_text` and `feed_marker` feed the same pieces by hand: text (never structure, whatever
    it spells) and special tokens by their spelling; between `feed_ids` calls they first flush
    the bytes of a character the ids left incomplete. Each call returns the events it completed.
    """

    def __init__(self, tools: Sequence[Tool] | None = None, thinking_open: bool = True,
                 tokenizer: Tokenizer | None = None) -> None:
        self._schemas = None if tools is None else properties_by_tool(tools)
        self._fallback = "reasoning" if thinking_open else "content"
        self._decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        # special id -> its spelling: the only ids that are structure
        self._markers = ({} if tokenizer is None else
                         {i: tokenizer.id_to_token(i) or "" for i in tokenizer.special_ids})
        self._state = "start"
        self._buf = ""  # text not yet consumed by the state machine
        self._ended = False  # saw an end marker (or finish): later input is ignored
        self._finished = False
        self._events: list[Event] = []
        self._skip_newline = False  # drop one "\n" after an explicit <think>
        self._newlines_left = 0  # "\n\n" after </think>
        self._started = 0
        # the call being parsed
        self._raw = ""  # its text so far, given back as content if it fails
        self._call: ToolCallStart | None = None  # None while parsing a call to an unknown tool
        self._call_name = ""
        self._params: list[tuple[str, str]] = []
        self._param = ""
        self._search_from = 0
        self._streamed = None  # the string value streamed so far of the current parameter, or None

    def feed_ids(self, ids: Iterable[int]) -> list[Event]:
        """Generated token ids; only the tokenizer's special ids are structure."""
        self._check_open("feed_ids")
        if self._decoder is None:
            raise ValueError("StreamParser.feed_ids needs the tokenizer: "
                             "StreamParser(tools, tokenizer=tok)")
        text: list[str] = []  # a run of text ids, decoded, fed at once
        for i in ids:
            if self._ended:
                break
            marker = self._markers.get(i)
            if marker is None:
                text.append(self._decoder.push(i))
                continue
            # A special id ends the text run: bytes of a character it cut become U+FFFD, as in
            # tokenizer.decode (every marker starts with an ASCII byte, so nothing else differs).
            text.append(self._decoder.flush())
            self._text("".join(text))
            text = []
            self._marker(marker)
        self._text("".join(text))
        return self._take()

    def feed_text(self, text: str) -> list[Event]:
        """Ordinary text tokens: structure only inside a tool-call block (the invoke XML)."""
        self._check_open("feed_text")
        self._flush_ids()
        self._text(text)
        return self._take()

    def feed_marker(self, marker: str) -> list[Event]:
        """A special token, by its spelling (one of tokenizer.SPECIAL_TOKENS)."""
        self._check_open("feed_marker")
        if marker not in SPECIAL_TOKENS:
            raise ValueError(f"feed_marker: {marker!r} is not a special token; expected one of "
                             f"{list(SPECIAL_TOKENS)}")
        self._flush_ids()
        self._marker(marker)
        return self._take()

    def finish(self) -> list[Event]:
        """The end of the output: completes or reports whatever is still open."""
        if self._finished:
            raise RuntimeError("StreamParser.finish called twice")
        self._flush_ids()
        self._finished = True
        self._end()
        return self._take()

    def _check_open(self, what: str) -> None:
        if self._finished:
            raise RuntimeError(f"StreamParser.{what} after finish")

    def _flush_ids(self) -> None:
        if self._decoder is not None:
            self._text(self._decoder.flush())

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _emit(self, ev: Event) -> None:
        if isinstance(ev, (ReasoningDelta, ContentDelta)):
            if not ev.text:
                return
            last = self._events[-1] if self._events else None
            if type(last) is type(ev):
                ev = type(ev)(last.text + ev.text)  # type: ignore[union-attr]
                self._events[-1] = ev
                return
        self._events.append(ev)

    def _text(self, text: str) -> None:
        if text and not self._ended:
            self._buf += text
            self._run(final=False)

    def _marker(self, marker: str) -> None:
        if self._ended:
            return
        if marker in _END_MARKERS:
            self._end()
            return
        if self._state == "start" and marker != THINK_OPEN:
            self._state = self._fallback  # the whitespace held so far is its text
            self._run(final=False)
        if self._state == "after_think":  # held for "\n"s that can no longer come first
            self._state = "content"
        state = self._state
        if state == "start":  # an opening <think>
            self._buf = ""
            self._skip_newline = True
            self._state = "reasoning"
        elif state == "reasoning" and marker == THINK_CLOSE:
            self._skip_newline = False
            self._emit(ReasoningDelta(_drop_last_newline(self._buf)))
            self._buf = ""
            self._newlines_left = 2
            self._state = "after_think"
        elif state == "content" and marker == TOOL_CALL_OPEN:
            self._emit(ContentDelta(_drop_last_newline(self._buf)))
            self._buf = ""
            self._state = "block"
        elif state in ("block", "invoke", "param") and marker == TOOL_CALL_CLOSE:
            self._run(final=True)  # no more text in this block: settle tags and values
            if self._state == "param":
                self._fail("unterminated parameter")
            elif self._state == "invoke":  # tolerate a missing </invoke>
                self._buf = ""
                self._end_call()
            if self._state == "block":
                self._buf = ""
                self._state = "content"
            else:  # the call failed and is content now: so is its closing marker
                self._text(marker)
        else:
            # No structure here (`<minimax:tool_call>` inside the thinking, `</think>` after it):
            # the marker reads as its spelling, as the M2 format has no other place for it.
            self._text(marker)

    def _end(self) -> None:
        """No more input: settle everything and release what was held back."""
        if self._ended:
            return
        self._ended = True
        if self._state == "start":
            self._state = self._fallback
        self._run(final=True)
        if self._state in ("invoke", "param"):
            self._fail("unterminated tool call")
            self._run(final=True)
        if self._state == "reasoning":
            self._emit(ReasoningDelta(self._buf))
        elif self._state == "content":
            self._emit(ContentDelta(self._buf))
        self._buf = ""

    def _run(self, final: bool) -> None:
        """Consume the buffer; `final`: no more text comes before the next marker or the end."""
        steps = {"start": self._step_start, "reasoning": self._step_reasoning,
                 "after_think": self._step_after_think, "content": self._step_content,
                 "block": self._step_block, "invoke": self._step_invoke, "param": self._step_param}
        while steps[self._state](final):
            pass

    # Each step consumes from self._buf and returns True if it made progress. Reasoning and
    # content hold back one trailing "\n" (the separator before `</think>` / `<minimax:tool_call>`)
    # until the next piece shows whether it was one.

    def _step_start(self, final: bool) -> bool:
        if not self._buf.strip():  # leading whitespace is dropped before an opening <think>
            return False
        self._state = self._fallback
        return True

    def _step_reasoning(self, final: bool) -> bool:
        if self._skip_newline:
            if not self._buf:
                return False
            self._skip_newline = False
            if self._buf.startswith("\n"):
                self._buf = self._buf[1:]
        self._emit(ReasoningDelta(self._release_all_but_newline()))
        return False

    def _step_after_think(self, final: bool) -> bool:
        while self._newlines_left and self._buf.startswith("\n"):
            self._buf = self._buf[1:]
            self._newlines_left -= 1
        if self._newlines_left and not self._buf:
            return False
        self._state = "content"
        return True

    def _step_content(self, final: bool) -> bool:
        self._emit(ContentDelta(self._release_all_but_newline()))
        return False

    def _step_block(self, final: bool) -> bool:
        # whitespace between calls is dropped as it arrives, so it is never given back as content
        s = self._buf = self._buf.lstrip()
        if s.startswith("<invoke"):
            tag = self._tag(s, final)
            if tag is None:
                return False
            m = _INVOKE_RE.fullmatch(tag)
            name = next(g for g in m.groups() if g is not None).strip() if m else ""
            if not name:
                self._fail(f"malformed tag {tag!r}")
                return True
            self._buf = s[len(tag):]
            self._start_call(name, tag)
            return True
        if not s:
            return False
        if not final and "<invoke".startswith(s):
            return False
        self._fail("unexpected text in a tool-call block")
        return True

    def _step_invoke(self, final: bool) -> bool:
        s = self._buf.lstrip()
        ws = self._buf[: len(self._buf) - len(s)]
        if s.startswith("<parameter"):
            tag = self._tag(s, final)
            if tag is None:
                return False
            m = _PARAM_RE.fullmatch(tag)
            if m is None:
                self._fail(f"malformed tag {tag!r}")
                return True
            name = next(g for g in m.groups() if g is not None)
            if any(n == name for n, _ in self._params):
                self._fail(f"parameter {name!r} given twice")
                return True
            self._raw += ws + tag
            self._buf = s[len(tag):]
            self._param = name
            self._search_from = 0
            self._streamed = None
            self._state = "param"
            return True
        if s.startswith(_INVOKE_CLOSE):
            self._raw += ws + _INVOKE_CLOSE
            self._buf = s[len(_INVOKE_CLOSE):]
            self._end_call()
            return True
        if not s or (not final and any(p.startswith(s) for p in ("<parameter", _INVOKE_CLOSE))):
            return False  # the closing marker or the end settles an invoke left open
        self._fail("unexpected text in an invoke")
        return True

    def _step_param(self, final: bool) -> bool:
        buf = self._buf
        while True:
            i = buf.find(_PARAM_CLOSE, self._search_from)
            if i < 0:
                self._search_from = max(0, len(buf) - len(_PARAM_CLOSE) + 1)
                # certain: all but a tail that could begin "</parameter>"
                keep = next((k for k in range(min(len(_PARAM_CLOSE) - 1, len(buf)), 0, -1)
                             if _PARAM_CLOSE.startswith(buf[-k:])), 0)
                self._stream_value(len(buf) - keep)
                return False  # the closing marker or the end reports the unterminated value
            j = i + len(_PARAM_CLOSE)
            k = _SPACES.match(buf, j).end()  # type: ignore[union-attr]
            after = buf[k: k + _LOOKAHEAD]  # no copy of a long remainder
            # final and nothing after: the value ends right before the closing marker
            if after.startswith(_AFTER_PARAM) or (final and not after):
                self._params.append((self._param, buf[:i]))
                self._stream_param()
                self._raw += buf[:j]
                self._buf = buf[j:]
                self._state = "invoke"
                return True
            if not final and len(after) < _LOOKAHEAD and any(p.startswith(after)
                                                             for p in _AFTER_PARAM):
                self._search_from = i  # cannot tell yet what follows this "</parameter>"
                self._stream_value(i)
                return False
            self._search_from = i + 1  # a literal "</parameter>" inside the value

    def _tag(self, s: str, final: bool) -> str | None:
        """The complete `<...>` tag at the start of `s` (a `>` inside a quoted value does not end
        it), or None to wait for more text."""
        gt = _tag_end(s)
        if gt >= 0:
            return s[: gt + 1]
        if not final and len(s) < _MAX_TAG:
            return None
        return s[:_MAX_TAG]  # fails the tag regex: reported as malformed

    def _release_all_but_newline(self) -> str:
        """Consume and return the buffer, keeping back a trailing "\\n" (maybe a separator)."""
        keep = 1 if self._buf.endswith("\n") else 0
        out = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep:]
        return out

    def _start_call(self, name: str, tag: str) -> None:
        self._raw = tag
        self._call_name = name
        self._params = []
        self._call = None
        if self._schemas is None or name in self._schemas:
            self._call = ToolCallStart(self._started, f"call_{secrets.token_hex(12)}", name)
            self._started += 1
            self._emit(self._call)
        self._state = "invoke"

    def _value(self, name: str, raw: str) -> Any:
        props = (self._schemas or {}).get(self._call_name, {})
        return value_from_text(raw, props.get(name) if self._schemas is not None else None)

    def _string_valued(self, name: str) -> bool:
        """Whether the parameter's value stays the text as written (so it can stream as it comes)."""
        if self._schemas is None:
            return True
        spec = self._schemas.get(self._call_name, {}).get(name)
        return spec is None or (isinstance(spec, Mapping) and spec.get("type") == "string"
                                and not any(k in spec for k in ("enum", "anyOf", "oneOf")))

    def _stream_value(self, upto: int) -> None:
        """Stream the part of a string value that is certain (the buffer before `upto`), less one
        trailing newline, which may be the separator value_from_text strips."""
        if self._call is None or not self._string_valued(self._param):
            return
        raw = self._buf[:upto]
        if raw.startswith("\n"):
            raw = raw[1:]
        elif not raw:
            return  # a first "\n" (stripped) may still come
        if raw.endswith("\n"):
            raw = raw[:-1]
        sent = self._streamed or ""
        if len(raw) <= len(sent):
            return
        if self._streamed is None:
            sep = "{" if not self._params else ", "
            self._emit(ToolCallArgs(self._call.index, sep + json.dumps(self._param, ensure_ascii=False) + ': "'))
        piece = raw[len(sent):]
        self._emit(ToolCallArgs(self._call.index, json.dumps(piece, ensure_ascii=False)[1:-1], self._param, piece))
        self._streamed = raw

    def _stream_param(self) -> None:
        """The rest of the JSON text of the parameter just parsed, as the started call's next piece."""
        if self._call is None:
            return
        name, raw = self._params[-1]
        value = self._value(name, raw)
        if self._streamed is not None:  # a string already streaming: its rest and the closing quote
            rest = value[len(self._streamed):]
            self._emit(ToolCallArgs(self._call.index, json.dumps(rest, ensure_ascii=False)[1:-1] + '"', name, rest))
            self._streamed = None
            return
        sep = "{" if len(self._params) == 1 else ", "
        piece = json.dumps(name, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)
        self._emit(ToolCallArgs(self._call.index, sep + piece))

    def _close_args(self) -> None:
        if self._streamed is not None:  # a string value cut off: close it
            self._emit(ToolCallArgs(self._call.index, '"'))
            self._streamed = None
            self._emit(ToolCallArgs(self._call.index, "}"))
            return
        self._emit(ToolCallArgs(self._call.index, "}" if self._params else "{}"))

    def _end_call(self) -> None:
        self._state = "block"
        if self._call is None:
            self._emit(ToolCallError(None, f"call to unknown tool {self._call_name!r}"))
            self._emit(ContentDelta(self._raw))
            return
        args = {k: self._value(k, v) for k, v in self._params}
        c = self._call
        self._close_args()
        self._emit(ToolCallEnd(c.index, c.id, c.name, args))

    def _fail(self, message: str) -> None:
        """Give up on the current call (if any): report it and re-read its text as content."""
        if self._state in ("invoke", "param"):
            index = self._call.index if self._call is not None else None
            if self._call is not None:
                self._close_args()
            self._emit(ToolCallError(index, f"tool call {self._call_name!r}: {message}"))
            self._buf = self._raw + self._buf
        else:
            self._emit(ToolCallError(None, message))
        self._state = "content"


def collect(events: Iterable[Event]) -> ParsedMessage:
    """Fold parser events into a message (what the batch parser returns)."""
    out = ParsedMessage()
    reasoning: list[str] = []
    content: list[str] = []
    for ev in events:
        if isinstance(ev, ReasoningDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCallEnd):
            out.tool_calls.append({"id": ev.id, "type": "function",
                                   "function": {"name": ev.name, "arguments": ev.arguments}})
        elif isinstance(ev, ToolCallError):
            out.errors.append(ev.message)
    out.reasoning = "".join(reasoning)
    out.content = "".join(content)
    return out


def parse_ids(
    ids: Sequence[int],
    tokenizer: Tokenizer,
    tools: Sequence[Tool] | None = None,
    thinking_open: bool = True,
) -> ParsedMessage:
    """Parse generated token ids (after the generation prompt) into a message."""
    p = StreamParser(tools, thinking_open=thinking_open, tokenizer=tokenizer)
    return collect(p.feed_ids(ids) + p.finish())


def parse_markup(
    text: str, tools: Sequence[Tool] | None = None, thinking_open: bool = True
) -> ParsedMessage:
    """Parse hand-written markup in which EVERY marker spelling is structure (docs, tests).

    Text cannot tell a real marker from one a user or tool typed, so model output must never come
    here: parse its ids with `parse_ids`.
    """
    p = StreamParser(tools, thinking_open=thinking_open)
    events: list[Event] = []
    for k, piece in enumerate(_MARKUP_RE.split(text)):
        events += p.feed_marker(piece) if k % 2 else p.feed_text(piece)
    return collect(events + p.finish())


def _tag_end(s: str) -> int:
    """Index of the `>` that closes the tag starting s, outside quotes; -1 if not within _MAX_TAG."""
    quote = ""
    for i, ch in enumerate(s[:_MAX_TAG]):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == ">":
            return i
    return -1


def _drop_last_newline(s: str) -> str:
    return s[:-1] if s.endswith("\n") else s
