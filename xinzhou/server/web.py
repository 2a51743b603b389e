"""The chat page served at `/`: one self-contained HTML page (no CDN, no build step), kept as a
Python string so that it ships inside the package without package-data settings. It streams from
/v1/chat/completions with `reasoning_split`, shows the thinking dimmed, and sends the thinking
back as `reasoning_details` on the next turn (interleaved thinking)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>xinzhou</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem}
#log div{margin:.5rem 0;white-space:pre-wrap}.user{font-weight:600}.think{color:#888;font-size:.9em}
form{display:flex;gap:.5rem}form label{display:flex;gap:.3rem;align-items:center}
form label:first-child{flex:1}#msg{flex:1;padding:.5rem}#key{width:10rem}
</style></head><body>
<h3>xinzhou <small id="model"></small></h3>
<div id="log"></div>
<form id="f"><label>Message <input id="msg" autofocus></label><label>API key (if the server has one) <input id="key"></label>
<button>Send</button></form>
<script>
const log = document.getElementById("log"), history = [];
let model = null;
function headers() {
  const k = document.getElementById("key").value, h = {"content-type": "application/json"};
  if (k) h["authorization"] = "Bearer " + k;
  return h;
}
function line(cls, text) { const d = document.createElement("div"); d.className = cls; d.textContent = text;
  log.appendChild(d); return d; }
async function getModel() {
  const r = await fetch("/v1/models", {headers: headers()});
  if (!r.ok) throw new Error((await r.json()).error.message);
  model = (await r.json()).data[0].id; document.getElementById("model").textContent = model;
}
document.getElementById("f").onsubmit = async (e) => {
  e.preventDefault();
  const input = document.getElementById("msg"), text = input.value.trim();
  if (!text) return;
  input.value = "";
  try { if (!model) await getModel(); } catch (err) { line("think", "error: " + err.message); return; }
  line("user", text); history.push({role: "user", content: text});
  const think = line("think", ""), answer = line("ai", "");
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(
    {model, messages: history, stream: true, reasoning_split: true})});
  if (!r.ok) { answer.textContent = "error: " + (await r.json()).error.message; history.pop(); return; }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", reasoning = "", content = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!ev.startsWith("data: ") || ev === "data: [DONE]") continue;
      const ch = JSON.parse(ev.slice(6)).choices[0];
      if (!ch) continue;
      reasoning += ch.delta.reasoning_content || ""; content += ch.delta.content || "";
      think.textContent = reasoning; answer.textContent = content;
    }
  }
  history.push({role: "assistant", content,
                reasoning_details: [{type: "reasoning.text", text: reasoning}]});
};
</script></body></html>
"""
