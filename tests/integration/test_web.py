"""The web page in a real browser: Debian's chromium, headless, driven by Playwright (never a browser of its own),
against the whole stack as `baton up` starts it (the tiny random Qwen3 on the hf engine, the default embedder).

One journey, in the order a person would take it: a wrong key is refused in plain words; sign in; drop documents and
see them ingested; search; ask a question, watch the answer stream and open its source; stop an answer (the
inference service stops generating); train views and watch the loss plot gain points while the GPU page shows the
training job holding the GPU; the admin's users-and-keys page; sign out. Every page is screenshotted into
var/screenshots/web/, checked for labels and keyboard reach, and the page's console stays free of errors.

The numbers of issue 16 are measured and printed: the first page load (cold, loopback: time and bytes), and how long
the page adds between pressing send and the first token on screen over the API's own time to first token. The
budgets are 300 ms, 300 KB and 50 ms; the asserts allow 2x, exactly, and 3x, for a loaded 2-core CI machine.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from playwright.sync_api import Browser as Chromium
from playwright.sync_api import ConsoleMessage, Page, sync_playwright

from baton.runtime.process import free_port
from baton.stack import Stack, StackPorts
from baton.v1 import inference_pb2, inference_pb2_grpc
from tests.fixtures.trainer import author_text, wait_until

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots" / "web"
LOAD_BUDGET_MS, LOAD_BUDGET_BYTES, FIRST_TOKEN_BUDGET_MS = 300.0, 300_000, 50.0
LOAD_LIMIT_MS, FIRST_TOKEN_LIMIT_MS = 2 * LOAD_BUDGET_MS, 3 * FIRST_TOKEN_BUDGET_MS
TRIES = 5
QUESTION = "What does the lighthouse keeper write about?"
DOCUMENTS = {f"journal-{i}.md": f"# Journal {i}\n\n## The lighthouse keeper\n\n{author_text(i, sentences=14)}\n"
             for i in range(6)}  # fmt: skip


@dataclass
class Browser:
    chromium: Chromium
    console: list[str] = field(default_factory=list)  # the page's errors (JavaScript errors, console.error)
    network: list[str] = field(default_factory=list)  # Chromium's "Failed to load resource" lines (HTTP 4xx/5xx)

    def watch(self, page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            if message.type != "error":
                return
            line = f"{message.text} at {message.location.get('url')}"
            (self.network if message.text.startswith("Failed to load resource") else self.console).append(line)

        page.on("console", on_console)
        page.on("pageerror", lambda error: self.console.append(f"uncaught: {error}"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("web-home")
    stack = Stack(home, StackPorts(*(free_port() for _ in range(6))))  # every port free, as in test_tenancy
    stack.up()
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the web page's tests need Debian's chromium (make chromium)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield Browser(chromium)
        chromium.close()


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def inference_running(stack: Stack) -> int:
    """Requests the inference service is generating or queueing now (a plain gRPC call: Playwright's sync API
    owns this thread's event loop)."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports.inference}") as channel:
        health = inference_pb2_grpc.InferenceStub(channel).Health(inference_pb2.InferenceHealthRequest(), timeout=10)
    return health.running_requests + health.queued_requests


# ------------------------------------------------------------------------------------------------ accessibility

# Every visible, enabled control: its accessible name (aria-label, a <label>, or its text) and a mark to find it by.
_CONTROLS = """() => {
  const controls = [...document.querySelectorAll('a[href], button, input, select, textarea')]
    .filter(e => !e.disabled && e.closest('[hidden]') === null && (e.offsetParent !== null || e.type === 'file'));
  return controls.map((e, i) => {
    e.dataset.a11y = i;
    const name = e.getAttribute('aria-label') || [...(e.labels || [])].map(l => l.textContent).join(' ')
      || e.textContent || e.title;
    return {i, what: e.outerHTML.slice(0, 80), name: (name || '').trim()};
  });
}"""


def check_accessibility(page: Page, what: str) -> None:
    controls = page.evaluate(_CONTROLS)
    unlabelled = [c["what"] for c in controls if not c["name"]]
    assert not unlabelled, f"{what}: controls without a label: {unlabelled}"
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    reached = set()
    for _ in range(len(controls) + 15):
        page.keyboard.press("Tab")
        mark = page.evaluate("() => document.activeElement?.dataset?.a11y ?? null")
        if mark is not None:
            reached.add(int(mark))
    missed = [c["what"] for c in controls if c["i"] not in reached]
    assert not missed, f"{what}: controls the keyboard does not reach: {missed}"


# ------------------------------------------------------------------------------------------------ the numbers


def cold_loads(browser: Browser, url: str) -> tuple[float, int]:
    """(median ms, most bytes) of three cold loads."""
    loads = [cold_load(browser, url) for _ in range(3)]
    return statistics.median(ms for ms, _ in loads), max(size for _, size in loads)


def cold_load(browser: Browser, url: str) -> tuple[float, int]:
    """(ms to the load event, bytes transferred) of the page in a fresh browser context (empty cache)."""
    context = browser.chromium.new_context()
    page = context.new_page()
    browser.watch(page)
    page.goto(url, wait_until="load")
    timing = page.evaluate("""() => {
      const nav = performance.getEntriesByType('navigation')[0];
      const resources = performance.getEntriesByType('resource');
      return {ms: nav.loadEventEnd - nav.startTime,
              bytes: nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0),
              files: resources.length};
    }""")
    context.close()
    assert timing["files"] >= 9, timing  # the CSS and every module were loaded (and counted)
    return timing["ms"], timing["bytes"]


_SEND_TO_FIRST_TOKEN = """() => new Promise(resolve => {
  const log = document.getElementById('chat-log');
  let start;
  const seen = new MutationObserver(() => {
    const answer = log.querySelector('.msg.assistant:last-child .text');
    if (start === undefined || !answer || !answer.textContent.length) return;
    seen.disconnect();
    resolve(performance.now() - start);
  });
  seen.observe(log, {subtree: true, childList: true, characterData: true});
  start = performance.now();
  document.getElementById('chat-send').click();
})"""


def api_first_token_ms(client: httpx.Client, stack: Stack, model: str) -> float:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": QUESTION}], "baton": {"rag": True}}
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    start = time.perf_counter()
    with client.stream("POST", f"{stack.ports.gateway_url}/v1/chat/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return (time.perf_counter() - start) * 1000
    raise AssertionError("the stream ended without a token")


def page_first_token_ms(page: Page, stack: Stack) -> float:
    page.click("#chat-new")
    page.fill("#chat-input", QUESTION)
    elapsed = page.evaluate(_SEND_TO_FIRST_TOKEN)
    page.evaluate("() => document.getElementById('chat-stop').click()")  # a no-op if the answer is complete
    page.wait_for_selector("#chat-send:enabled")
    return float(elapsed)


def idle(stack: Stack) -> None:
    wait_until(lambda: inference_running(stack) == 0, 30, "the inference service idle")


# ------------------------------------------------------------------------------------------------ the journey


def test_the_web_page_end_to_end(stack: Stack, browser: Browser, tmp_path: Path) -> None:
    url = f"{stack.ports.gateway_url}/"
    load_ms, load_bytes = cold_loads(browser, url)
    print(f"\nfirst page load (cold, loopback): median {load_ms:.0f} ms, {load_bytes / 1000:.1f} KB transferred")

    context = browser.chromium.new_context(viewport={"width": 1280, "height": 860}, locale="en-US")
    page = context.new_page()
    browser.watch(page)
    page.goto(url)
    sign_in_refuses_a_wrong_key(page)
    wrong_key_lines = len(browser.network)
    sign_in(page, stack.api_key)
    memory_ingests_and_searches(page, tmp_path)
    chat_streams_and_cites(page)
    overhead_ms = first_token_overhead(page, stack)
    if overhead_ms > FIRST_TOKEN_LIMIT_MS:  # a test beside it loading both cores only adds time: measure once more
        overhead_ms = min(overhead_ms, first_token_overhead(page, stack))
    stop_aborts_generation(page, stack)
    views_train_with_a_live_plot(page)
    gpu_history_api(stack)
    admin_manages_users(page, stack)
    russian_by_browser_language(browser, url)
    context.close()
    if load_ms > LOAD_LIMIT_MS:  # as for the first token: a busy neighbour only adds time, so measure once more
        load_ms = min(load_ms, cold_loads(browser, url)[0])

    assert browser.console == [], f"the page logged errors: {browser.console}"
    assert all("/v1/me" in line and "401" in line for line in browser.network[:wrong_key_lines])
    assert browser.network[wrong_key_lines:] == [], f"requests failed: {browser.network[wrong_key_lines:]}"
    assert load_bytes <= LOAD_BUDGET_BYTES, f"first load transferred {load_bytes} bytes"
    assert load_ms <= LOAD_LIMIT_MS, f"first load took {load_ms:.0f} ms (budget {LOAD_BUDGET_MS:g}, CI limit)"
    assert overhead_ms <= FIRST_TOKEN_LIMIT_MS, f"the page adds {overhead_ms:.0f} ms to the first token"


def sign_in_refuses_a_wrong_key(page: Page) -> None:
    page.fill("#signin-key", "bt_this-key-does-not-exist")
    page.click("#signin-submit")
    page.wait_for_selector("#signin-error:text('not valid')")
    assert page.is_visible("#page-signin") and not page.is_visible("#nav")
    check_accessibility(page, "sign-in")
    shot(page, "signin")


def sign_in(page: Page, key: str) -> None:
    page.fill("#signin-key", key)
    page.keyboard.press("Enter")
    page.wait_for_selector("#page-chat:not([hidden])")
    assert "tenant default" in page.text_content("#whoami")
    assert page.evaluate("() => sessionStorage.getItem('baton.key')") == key


def memory_ingests_and_searches(page: Page, tmp_path: Path) -> None:
    page.click("#nav a[data-page=memory]")
    # A drop of files, as the browser delivers one (a DataTransfer of File objects) on the drop zone.
    page.evaluate(
        """(docs) => {
          const data = new DataTransfer();
          for (const [name, text] of Object.entries(docs)) data.items.add(new File([text], name));
          document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
        }""",
        DOCUMENTS,
    )
    page.wait_for_selector("#upload-status:text('Done: 6 added')", timeout=60_000)
    rows = page.locator("#doc-table tbody tr")
    assert rows.count() == 6
    assert all(int(rows.nth(i).locator("td").nth(2).text_content()) >= 1 for i in range(6))  # chunk counts
    page.fill("#search-query", "lighthouse keeper")
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-hits:not([hidden]) tbody tr")
    first = page.locator("#search-hits tbody tr").first.locator("td")
    assert "Journal" in first.nth(1).text_content() and float(first.nth(3).text_content()) > 0
    check_accessibility(page, "memory")
    shot(page, "memory")


def chat_streams_and_cites(page: Page) -> None:
    page.click("#nav a[data-page=chat]")
    page.wait_for_selector("#chat-model option", state="attached")
    page.fill("#chat-input", QUESTION)
    page.click("#chat-send")
    assert page.is_enabled("#chat-stop")
    page.wait_for_function("() => document.querySelector('.msg.assistant .text')?.textContent.length > 0")
    page.wait_for_selector(".msg.assistant .sources button", timeout=120_000)
    page.click(".msg.assistant .sources button >> nth=0")
    assert page.is_visible("#chat-source")
    assert page.text_content("#chat-source-title").startswith("[1] Journal")
    assert "lighthouse keeper" in page.text_content("#chat-source-where").lower()  # the heading
    assert page.text_content("#chat-source-text").strip()
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('baton.chats.default'))")
    assert stored[0]["messages"][0]["content"] == QUESTION and stored[0]["messages"][1]["citations"]
    check_accessibility(page, "chat")
    shot(page, "chat")


def first_token_overhead(page: Page, stack: Stack) -> float:
    """send → first token on screen, minus the API's own time to first token; interleaved, medians of TRIES."""
    model = page.input_value("#chat-model")
    on_page, direct = [], []
    with httpx.Client(timeout=60) as client:  # keep-alive, as the browser's connection is
        for _ in range(TRIES + 1):
            idle(stack)
            on_page.append(page_first_token_ms(page, stack))
            idle(stack)
            direct.append(api_first_token_ms(client, stack, model))
    on_page, direct = on_page[1:], direct[1:]  # the first of each warms up (JIT, connections)
    overhead = statistics.median(on_page) - statistics.median(direct)
    print(f"send → first token: page median {statistics.median(on_page):.0f} ms, API median "
          f"{statistics.median(direct):.0f} ms, the page adds {overhead:.0f} ms")  # fmt: skip
    return overhead


def stop_aborts_generation(page: Page, stack: Stack) -> None:
    for _ in range(3):  # the random model may end an answer early (EOS): ask again until one is still running
        idle(stack)
        page.click("#chat-new")
        page.fill("#chat-input", "Tell me everything, at length.")
        page.click("#chat-send")
        page.wait_for_function("() => document.querySelector('.msg.assistant .text')?.textContent.length > 0")
        if inference_running(stack) == 1:
            break
        page.wait_for_selector("#chat-send:enabled")
    else:
        pytest.fail("three answers in a row ended before Stop could be pressed")
    page.click("#chat-stop")
    page.wait_for_selector(".msg.assistant:has-text('(stopped)')")
    wait_until(lambda: inference_running(stack) == 0, 5, "generation stopped in the inference service")
    metrics = httpx.get(f"{stack.ports.gateway_url}/metrics/").text.splitlines()
    gone = [line for line in metrics if line.startswith("baton_gateway_chat_requests_total") and "client_gone" in line]
    assert gone and float(gone[0].split()[-1]) >= 1, "the gateway saw the client leave"


def views_train_with_a_live_plot(page: Page) -> None:
    page.click("#nav a[data-page=gpu]")
    page.wait_for_selector("#gpu-holders tr[data-kind=serving]")
    assert page.locator("#gpu-holders tr[data-kind=training]").count() == 0
    page.click("#nav a[data-page=views]")
    settings = {"#train-name": "journal-views", "#train-steps": "30", "#train-rank": "4", "#train-lr": "0.003",
                "#train-seq": "64"}  # fmt: skip
    for selector, value in settings.items():
        page.fill(selector, value)
    page.uncheck("#train-qlora")
    page.click("#train-estimate")
    page.wait_for_selector("#train-estimate-text:text('GPU memory')", timeout=60_000)
    page.click("#train-start")
    page.wait_for_function("() => document.querySelectorAll('#loss-plot circle.loss').length >= 2", timeout=180_000)
    page.click("#nav a[data-page=gpu]")
    page.wait_for_selector("#gpu-holders tr[data-kind=training]", timeout=30_000)  # the holder changed
    check_accessibility(page, "gpu")
    page.click("#nav a[data-page=views]")
    page.wait_for_selector("#job-state:text('succeeded')", timeout=180_000)
    assert page.locator("#loss-plot circle.loss").count() >= 2
    assert "perplexity" in page.text_content("#job-result")
    page.wait_for_selector("#adapter-table tbody tr:has-text('journal-views')")
    check_accessibility(page, "views")
    shot(page, "views")
    page.click("#nav a[data-page=gpu]")
    page.wait_for_selector("#gpu-timeline rect.bar.training")  # the job's lease, on the last hour's timeline
    shot(page, "gpu")


def gpu_history_api(stack: Stack) -> None:
    """The timeline's JSON (a route of the OpenAPI document): the finished job's lease, released, and serving."""
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    url = f"{stack.ports.gateway_url}/v1/gpu/history"
    body = httpx.get(url, params={"window_s": 3600}, headers=headers).json()
    kinds = {(i["kind"], i["end"]) for i in body["intervals"]}
    assert ("training", "released") in kinds and any(kind == "serving" for kind, _ in kinds), body
    assert all(i["job_id"] for i in body["intervals"] if i["kind"] == "training")  # the tenant's own job
    assert httpx.get(url, params={"window_s": 0}, headers=headers).status_code == 422
    assert "/v1/gpu/history" in httpx.get(f"{stack.ports.gateway_url}/openapi.json").json()["paths"]


def admin_manages_users(page: Page, stack: Stack) -> None:
    page.click("#sign-out")
    page.wait_for_selector("#page-signin:not([hidden])")
    assert page.evaluate("() => sessionStorage.getItem('baton.key')") is None
    sign_in_admin(page, (stack.home / "admin.key").read_text().strip())
    page.fill("#user-name", "web-guest")
    page.click("#user-form button[type=submit]")
    page.wait_for_selector("#user-secret:text('bt_')")
    page.wait_for_selector("#user-table tbody tr:has-text('web-guest')")
    check_accessibility(page, "users")
    shot(page, "users")
    page.select_option("#lang", "ru")
    assert page.text_content("#nav a[data-page=users]") == "Пользователи и ключи"
    # Signing out while the page redraws (the language switch re-reads the users, then each one's keys): what was
    # under way with the key is cut off, and nothing goes out after it without the key (a 401 would land in
    # browser.network and put "not valid" under the sign-in form).
    with page.expect_event("requestfailed", timeout=10_000) as cut_off:
        page.evaluate(_SWITCH_TO_ENGLISH_AND_SIGN_OUT)
    assert "/v1/users" in cut_off.value.url, cut_off.value.url
    page.wait_for_selector("#page-signin:not([hidden])")
    assert page.text_content("#signin-error") == ""


_SWITCH_TO_ENGLISH_AND_SIGN_OUT = """() => {
  const lang = document.getElementById('lang');
  lang.value = 'en';
  lang.dispatchEvent(new Event('change'));
  document.getElementById('sign-out').click();
}"""


def sign_in_admin(page: Page, key: str) -> None:
    page.fill("#signin-key", key)
    page.click("#signin-submit")
    page.wait_for_selector("#page-users:not([hidden])")
    assert not page.is_visible("#nav a[data-page=chat]")  # the admin key manages users and keys only


def russian_by_browser_language(browser: Browser, url: str) -> None:
    context = browser.chromium.new_context(locale="ru-RU")
    page = context.new_page()
    browser.watch(page)
    page.goto(url)
    assert page.text_content("#page-signin h1") == "Вход"
    context.close()
