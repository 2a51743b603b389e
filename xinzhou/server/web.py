"""The chat page served at `/`: one self-contained HTML page (no CDN, no build step), kept as a
Python string so that it ships inside the package without package-data settings.

It streams from /v1/chat/completions with `reasoning_split`. Each assistant turn shows its
thinking in a `<details>` ("thinking", closed by default) above the answer, and the thinking goes
back as `reasoning_details` on the next turn (interleaved thinking).

Tools: an OpenAI-style `tools` list pasted into "Tools (JSON)" goes with every request (invalid
JSON is an error line and nothing is sent). Tool calls show (name, arguments) once each has parsed whole; a
reply with calls goes into the history as an assistant message with `tool_calls`, and each call
gets a result box and a "Send result" button. Once every call's result is sent, the results go
back as `tool` messages and the next assistant turn is requested by itself; a new message waits
until then (an error line says so).

Sampling: the "advanced" fields `temperature` and `max_tokens` are sent when filled; the query
parameters `?temperature=0&max_tokens=64` prefill them (greedy, reproducible replies: the tests
use that). Empty fields leave the server's defaults.

Errors (an HTTP error, an `error` object in the stream, a dropped stream) are an error line; the
history is rolled back to before the failed request, so the page stays usable. Model output is
only ever set as textContent.

For tests and scripts: every assistant turn is a `.turn` that gets `data-finish` (the finish
reason) when its stream ends, or the class `failed`; `.think` is the thinking's `<details>`,
`.think-text` its text, `.answer` the answer, `.call` a tool call (`.call-name`, `.call-args`,
`.result`, `.send-result`), `.error` an error line.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>xinzhou</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem}
#log>div{margin:.5rem 0;white-space:pre-wrap}.user{font-weight:600}
.think{color:#888;font-size:.9em}.think summary{cursor:pointer}.think-text{white-space:pre-wrap}
.call{border-left:3px solid #ccc;padding:.2rem .5rem;margin:.3rem 0}.call-name{font-weight:600}
.call-args{font-family:ui-monospace,monospace;font-size:.9em;white-space:pre-wrap}
.result{display:block;width:100%;box-sizing:border-box;margin:.3rem 0;font-family:ui-monospace,monospace}
.error{color:#b00}.note{color:#888;font-size:.9em}
form{display:flex;flex-direction:column;gap:.5rem}.row{display:flex;gap:.5rem;flex-wrap:wrap}
.row label{display:flex;gap:.3rem;align-items:center}.row label.grow{flex:1}#msg{flex:1;padding:.5rem}
#key{width:10rem}#tools{width:100%;box-sizing:border-box;font-family:ui-monospace,monospace}
#temperature,#max-tokens{width:5rem}
</style></head><body>
<h3>xinzhou <small id="model"></small></h3>
<div id="log"></div>
<form id="f">
<div class="row"><label class="grow">Message <input id="msg" autocomplete="off" autofocus></label>
<label>API key (if the server has one) <input id="key" autocomplete="off"></label>
<button id="send">Send</button></div>
<label for="tools">Tools (JSON), optional: an OpenAI-style <code>tools</code> list sent with every request</label>
<textarea id="tools" rows="3" spellcheck="false" placeholder='[{"type": "function", "function": {"name": "...", "parameters": {...}}}]'></textarea>
<details id="advanced"><summary>advanced</summary><div class="row">
<label>temperature <input id="temperature" inputmode="decimal" placeholder="default"></label>
<label>max_tokens <input id="max-tokens" inputmode="numeric" placeholder="default"></label></div></details>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), messages = [];  // the conversation as the API takes it
let model = null, busy = false, pending = null;  // pending: the tool calls that wait for results
const query = new URLSearchParams(location.search);
if (query.has("temperature")) $("temperature").value = query.get("temperature");
if (query.has("max_tokens")) $("max-tokens").value = query.get("max_tokens");

function el(tag, cls, text, parent) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  (parent || log).appendChild(e);
  return e;
}
function error(text) { const e = el("div", "error", "error: " + text); e.scrollIntoView({block: "nearest"}); return e; }
function setBusy(b) { busy = b; $("send").disabled = b; }
function headers() {
  const k = $("key").value, h = {"content-type": "application/json"};
  if (k) h["authorization"] = "Bearer " + k;
  return h;
}
async function failureOf(r) {  // the message of an HTTP error, whatever its body
  const text = await r.text().catch(() => "");
  try { const b = JSON.parse(text); if (b && b.error && b.error.message) return b.error.message; } catch (e) {}
  return "HTTP " + r.status + (r.statusText ? " " + r.statusText : "") + (text ? ": " + text.slice(0, 300) : "");
}
function options() {  // the request's optional fields; throws with a message to show
  const body = {}, tools = $("tools").value.trim();
  if (tools) {
    let t;
    try { t = JSON.parse(tools); } catch (e) { throw new Error("Tools (JSON) is not valid JSON (" + e.message + "); nothing was sent"); }
    if (!Array.isArray(t)) throw new Error("Tools (JSON) must be a JSON list of tools; nothing was sent");
    body.tools = t;
  }
  const temp = $("temperature").value.trim(), max = $("max-tokens").value.trim();
  if (temp) {
    if (!isFinite(Number(temp))) throw new Error("temperature " + JSON.stringify(temp) + " is not a number; nothing was sent");
    body.temperature = Number(temp);
  }
  if (max) {
    if (!/^[0-9]+$/.test(max)) throw new Error("max_tokens " + JSON.stringify(max) + " is not a whole number; nothing was sent");
    body.max_tokens = Number(max);
  }
  return body;
}
async function getModel() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (!r.ok) throw new Error(await failureOf(r));
  model = (await r.json()).data[0].id; $("model").textContent = model;
}

// One assistant turn over the history as it is; on failure the conversation goes back to `mark`.
async function turn(opts, mark) {
  setBusy(true);
  let box = null;
  try {
    if (!model) await getModel();
    box = el("div", "turn");
    const details = el("details", "think", undefined, box);
    el("summary", "", "thinking", details);
    const think = el("div", "think-text", "", details), answer = el("div", "answer", "", box);
    const callBox = el("div", "calls", undefined, box), calls = [];
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(
      Object.assign({model, messages, stream: true, reasoning_split: true}, opts))});
    if (!r.ok) throw new Error(await failureOf(r));
    let reasoning = "", content = "", finish = null;
    const onEvent = (ev) => {
      const data = ev.split("\\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
      if (!data || data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message || JSON.stringify(obj.error));
      const ch = (obj.choices || [])[0];
      if (!ch) return;
      const d = ch.delta || {};
      if (d.reasoning_content) { reasoning += d.reasoning_content; think.textContent = reasoning; }
      if (d.content) { content += d.content; answer.textContent = content; }
      for (const tc of d.tool_calls || []) {
        const i = typeof tc.index === "number" ? tc.index : calls.length;
        if (!calls[i]) {
          const view = el("div", "call", undefined, callBox), nameEl = el("span", "call-name", "", view);
          el("span", "", " ", view);
          calls[i] = {id: "", name: "", args: "", view, nameEl, argsEl: el("span", "call-args", "", view)};
        }
        const c = calls[i], fn = tc.function || {};
        if (tc.id) c.id = tc.id;
        if (fn.name) { c.name += fn.name; c.nameEl.textContent = c.name; }
        if (fn.arguments) { c.args += fn.arguments; c.argsEl.textContent = c.args; }
      }
      if (ch.finish_reason) finish = ch.finish_reason;
    };
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      buf += done ? dec.decode() : dec.decode(value, {stream: true});
      buf = buf.replace(/\\r\\n/g, "\\n");
      let i;
      while ((i = buf.indexOf("\\n\\n")) >= 0) { const ev = buf.slice(0, i); buf = buf.slice(i + 2); onEvent(ev); }
      if (done) { if (buf.trim()) onEvent(buf); break; }
    }
    if (!finish) throw new Error("the stream ended before the reply was finished");
    if (finish === "length") el("div", "note", "(cut off at max_tokens)", box);
    const msg = {role: "assistant", content, reasoning_details: [{type: "reasoning.text", text: reasoning}]};
    const made = calls.filter((c) => c);
    if (made.length) {
      msg.tool_calls = made.map((c) => ({id: c.id, type: "function", function: {name: c.name, arguments: c.args}}));
      pending = made;
      for (const c of made) {
        c.ta = el("textarea", "result", undefined, c.view);
        c.ta.rows = 2; c.ta.placeholder = "the result of " + (c.name || "this call");
        c.btn = el("button", "send-result", "Send result", c.view);
        c.btn.type = "button";
        c.btn.onclick = () => sendResult(c);
      }
    }
    messages.push(msg);
    box.dataset.finish = finish;
    return true;
  } catch (err) {
    messages.length = mark;
    if (box) box.classList.add("failed");
    error(err.message || String(err));
    return false;
  } finally {
    setBusy(false);
  }
}

// A call's result is final once sent; when every call of the reply has one, the next turn goes.
async function sendResult(c) {
  if (busy || pending === null || !pending.includes(c)) return;
  if (!c.ta.value.trim()) { error("type the result of " + (c.name || "the call") + " before sending it"); return; }
  const lock = (x, on) => { x.sent = on; x.ta.disabled = x.btn.disabled = on; };
  lock(c, true);
  if (!pending.every((x) => x.sent)) return;
  let opts;
  try { opts = options(); } catch (err) { error(err.message); lock(c, false); return; }
  const calls = pending, mark = messages.length;
  pending = null;
  for (const x of calls) messages.push({role: "tool", tool_call_id: x.id, content: x.ta.value});
  if (!(await turn(opts, mark))) { pending = calls; lock(c, false); }
}

$("f").onsubmit = async (e) => {
  e.preventDefault();
  if (busy) return;
  const input = $("msg"), text = input.value.trim();
  if (!text) return;
  if (pending) { error("send the results of the tool calls above first"); return; }
  let opts;
  try { opts = options(); } catch (err) { error(err.message); return; }
  input.value = "";
  el("div", "user", text);
  const mark = messages.length;
  messages.push({role: "user", content: text});
  if (!(await turn(opts, mark)) && !input.value) input.value = text;
};
</script></body></html>
"""
