"""The chat page at `/` in a real headless Chromium against `xinzhou serve` on loopback: what the
page shows is what the API returns for the same request (greedy), the thinking sits in a closed
<details>, a tool turn goes round (call shown, result sent back with the thinking, next answer
requested by itself), and errors show as an error line and leave the page usable."""

import json
import os
from urllib.parse import urlencode

import openai
import pytest

from xinzhou import tasks
from xinzhou.tasks.tools import TOOLS

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("the browser test needs Debian's chromium and chromium-driver packages "
                "(apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MAX_TOKENS = 64
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}
WAIT = 90  # seconds for one reply; the test model runs on CPU


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    # a driver path given to Service: Selenium Manager is never run (it would download a driver)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def oc(served):
    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="none", max_retries=0, timeout=WAIT)


def api(oc, served, messages, tools=None, **sampling):
    """The non-streamed reply to a request, and the prompt the server ran for it."""
    extra = {"tools": tools} if tools else {}
    r = oc.chat.completions.create(model=served.name, messages=messages, extra_body={"reasoning_split": True},
                                   **{**GREEDY, **sampling}, **extra)
    return r.choices[0], served.prompts[-1]


@pytest.fixture(scope="module")
def calling_question(served, oc):
    """A held-out tool question on which the model (greedy, through the API) really calls a tool."""
    for s in tasks.generate("tools", "test", 40, 0):
        question = s.messages[0]["content"]
        choice, prompt = api(oc, served, [{"role": "user", "content": question}], TOOLS)
        calls = choice.message.tool_calls or []
        if choice.finish_reason == "tool_calls" and calls and all(_is_json(c.function.arguments) for c in calls):
            return question, choice.message, prompt
    pytest.fail("the test model called no tool on 40 held-out questions: its training fixture is broken")


def _is_json(text):
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def open_page(driver, served, **query):
    driver.get(served.base_url + "/" + ("?" + urlencode(query) if query else ""))
    WebDriverWait(driver, WAIT).until(lambda d: d.execute_script("return document.readyState") == "complete")


def text_of(element):
    return element.get_property("textContent")


def ended_turns(driver, n):
    """Wait until n assistant turns have ended (finished or failed); return all turns."""
    def ended(d):
        turns = d.find_elements(By.CSS_SELECTOR, ".turn")
        done = [t for t in turns if t.get_attribute("data-finish") or "failed" in t.get_attribute("class").split()]
        return turns if len(done) >= n else False
    return WebDriverWait(driver, WAIT).until(ended)


def errors_at_least(driver, n):
    """Wait until the page shows n error lines; return them."""
    def shown(d):
        errors = d.find_elements(By.CSS_SELECTOR, "#log .error")
        return errors if len(errors) >= n else False
    return WebDriverWait(driver, WAIT).until(shown)


def send(driver, text):
    box = driver.find_element(By.ID, "msg")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def set_tools(driver, text):
    """Paste text into the Tools (JSON) box."""
    driver.execute_script("arguments[0].value = arguments[1]", driver.find_element(By.ID, "tools"), text)


def shown(turn):
    """What an assistant turn shows: thinking, answer and calls [(name, arguments text)]."""
    def part(element, css):
        return text_of(element.find_element(By.CSS_SELECTOR, css))
    calls = [(part(c, ".call-name"), part(c, ".call-args")) for c in turn.find_elements(By.CSS_SELECTOR, ".call")]
    return part(turn, ".think-text"), part(turn, ".answer"), calls


def test_plain_message_shows_the_apis_answer_and_folds_the_thinking(served, browser, oc):
    question = "What is 4821*37?"
    choice, api_prompt = api(oc, served, [{"role": "user", "content": question}])
    want = choice.message
    assert want.reasoning_content, "the test model wrote no thinking: the check below would be empty"
    open_page(browser, served, temperature=0, max_tokens=MAX_TOKENS)
    n = len(served.prompts)
    send(browser, question)
    [turn] = ended_turns(browser, 1)
    assert turn.get_attribute("data-finish") == choice.finish_reason
    assert served.prompts[n:] == [api_prompt]  # the page sent the same request
    thinking, answer, calls = shown(turn)
    assert (thinking, answer, calls) == (want.reasoning_content, want.content or "", [])
    details = turn.find_element(By.CSS_SELECTOR, "details.think")
    assert details.get_property("open") is False
    assert text_of(details.find_element(By.CSS_SELECTOR, "summary")) == "thinking"
    assert not turn.find_element(By.CSS_SELECTOR, ".think-text").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, "#log .user").text == question
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .error")


def test_tool_turn_shows_the_call_and_sends_the_result_back_with_the_thinking(served, browser, oc, calling_question):
    question, want, api_prompt = calling_question
    open_page(browser, served, temperature=0, max_tokens=MAX_TOKENS)
    set_tools(browser, json.dumps(TOOLS))
    n = len(served.prompts)
    send(browser, question)
    [turn] = ended_turns(browser, 1)
    assert turn.get_attribute("data-finish") == "tool_calls"
    assert served.prompts[n:] == [api_prompt]
    thinking, answer, calls = shown(turn)
    assert thinking == want.reasoning_content and thinking
    assert answer == (want.content or "")
    assert [(name, json.loads(args)) for name, args in calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in want.tool_calls]
    assert turn.find_element(By.CSS_SELECTOR, "details.think").get_property("open") is False

    results = [tasks.tools.execute(c.function.name, c.function.arguments) for c in want.tool_calls]
    for view, result in zip(turn.find_elements(By.CSS_SELECTOR, ".call"), results):
        assert len(served.prompts) == n + 1  # nothing goes before every call has its result
        view.find_element(By.CSS_SELECTOR, ".result").send_keys(result)
        view.find_element(By.CSS_SELECTOR, ".send-result").click()
    turns = ended_turns(browser, 2)
    assert len(turns) == 2 and turns[1].get_attribute("data-finish"), "the second turn failed"
    assert len(served.prompts) == n + 2
    for view in turn.find_elements(By.CSS_SELECTOR, ".call"):
        assert not view.find_element(By.CSS_SELECTOR, ".result").is_enabled()
    sent = served.tokenizer.decode(served.prompts[n + 1])
    assert f"<think>\n{thinking}\n</think>" in sent
    for result in results:
        assert f"<response>{result}</response>" in sent

    # the second answer is the API's for the same conversation, sent as an OpenAI client would
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": want.content or "",
                 "tool_calls": [c.model_dump() for c in want.tool_calls],
                 "reasoning_details": [{"type": "reasoning.text", "text": want.reasoning_content}]}]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": r} for c, r in zip(want.tool_calls, results)]
    choice, api_prompt2 = api(oc, served, messages, TOOLS)
    assert api_prompt2 == served.prompts[n + 1]
    thinking2, answer2, calls2 = shown(turns[1])
    assert turns[1].get_attribute("data-finish") == choice.finish_reason
    assert (thinking2, answer2) == (choice.message.reasoning_content, choice.message.content or "")
    assert [(name, json.loads(args)) for name, args in calls2] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
    assert answer2 or calls2, "the second turn shows no answer"
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .error")


def test_errors_show_as_a_line_and_the_page_stays_usable(served, browser, oc):
    open_page(browser, served, temperature=0, max_tokens=8)
    n = len(served.prompts)

    # invalid tools JSON: an error line, no request, the message kept for another try
    set_tools(browser, '[{"type": "function", ')
    send(browser, "hello")
    [err] = errors_at_least(browser, 1)
    assert "Tools (JSON) is not valid JSON" in err.text
    assert len(served.prompts) == n
    assert not browser.find_elements(By.CSS_SELECTOR, ".turn, #log .user")
    assert browser.find_element(By.ID, "msg").get_property("value") == "hello"

    # an HTTP error: the server's 400 message for a tool list it rejects
    set_tools(browser, '[{"type": "function"}]')
    browser.find_element(By.ID, "send").click()
    err = errors_at_least(browser, 2)[1]
    assert err.text.startswith("error: invalid tool definition")
    [turn] = ended_turns(browser, 1)
    assert "failed" in turn.get_attribute("class").split()
    assert len(served.prompts) == n
    assert browser.find_element(By.ID, "msg").get_property("value") == "hello"

    # an error object inside the stream (the test server has no way to fail mid-stream, so the
    # page's fetch gets a canned stream for this one request)
    set_tools(browser, "")
    browser.execute_script("""
        const real = window.fetch, sse = (o) => "data: " + JSON.stringify(o) + "\\n\\n";
        window.fetch = (url, init) => {
          if (!String(url).endsWith("/v1/chat/completions")) return real(url, init);
          window.fetch = real;
          return Promise.resolve(new Response(
            sse({choices: [{index: 0, delta: {reasoning_content: "partial"}, finish_reason: null}]}) +
            sse({error: {message: "the engine failed mid-stream", type: "server_error"}}) + "data: [DONE]\\n\\n",
            {headers: {"content-type": "text/event-stream"}}));
        };""")
    browser.find_element(By.ID, "send").click()
    err = errors_at_least(browser, 3)[2]
    assert err.text == "error: the engine failed mid-stream"
    turns = ended_turns(browser, 2)
    assert "failed" in turns[1].get_attribute("class").split()
    assert len(served.prompts) == n

    # still usable, and the failed requests left nothing in the conversation
    browser.find_element(By.ID, "send").click()
    turns = ended_turns(browser, 3)
    assert turns[2].get_attribute("data-finish"), "the request after the errors failed"
    assert len(served.prompts) == n + 1
    choice, api_prompt = api(oc, served, [{"role": "user", "content": "hello"}], max_tokens=8)
    assert api_prompt == served.prompts[n]
    assert shown(turns[2]) == (choice.message.reasoning_content, choice.message.content or "", [])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .error")) == 3
