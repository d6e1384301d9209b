"""The app in a real headless browser (Debian's chromium + playwright): offline page, live pruning, chat, stop."""

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from test_app_api import serving

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


@pytest.fixture(scope="module")
def url():
    with serving() as demo:
        yield demo.local_url


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        yield browser
        browser.close()


class Watched:
    """A page plus every request that left 127.0.0.1 and every console error."""

    def __init__(self, browser, url):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.outside, self.errors = [], []
        self.page.on("request", lambda r: urlparse(r.url).hostname not in LOCAL_HOSTS and r.url.startswith("http")
                     and self.outside.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url, wait_until="domcontentloaded")
        self.page.locator("#load").wait_for(timeout=30_000)

    def text(self, elem_id: str) -> str:
        return self.page.locator(f"#{elem_id}").inner_text()

    def wait_text(self, elem_id: str, needle: str, timeout: float = 120_000) -> None:
        try:
            self.page.wait_for_function(
                "([id, needle]) => (document.getElementById(id)?.innerText || '').includes(needle)",
                arg=[elem_id, needle], timeout=timeout)
        except Exception:
            self.shot(f"failed-waiting-for-{elem_id}.png")
            raise AssertionError(f"#{elem_id} never showed {needle!r}; it shows {self.text(elem_id)!r}") from None

    def fill(self, elem_id: str, value) -> None:
        box = self.page.locator(f"#{elem_id}").locator("textarea, input").first
        box.fill(str(value))
        box.press("Tab")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


def calibrate_with_text(w: Watched, text_file) -> None:
    """Calibration from a text file, 4 windows of 32 tokens: what every tiny-model run here uses."""
    w.page.locator("#calib").get_by_text("Text files", exact=True).click()
    w.page.locator("#calib-files input[type=file]").set_input_files(str(text_file))
    w.page.wait_for_timeout(1000)
    w.fill("nsamples", 4)
    w.fill("seqlen", 32)


def test_tiny_model_live_prune_heatmap_chat(browser, url, tiny_model_dir, text_file):
    w = Watched(browser, url)
    page = w.page
    assert "Load model" in w.text("load") and page.locator("#start button, button#start").first.is_disabled()
    w.shot("01-start.png")

    page.locator("#source").get_by_text("Local folder", exact=True).click()
    w.fill("folder", tiny_model_dir)
    page.locator("#load").click()
    w.wait_text("load-status", "Loaded")
    assert "LlamaForCausalLM" in w.text("model-card")

    calibrate_with_text(w, text_file)
    page.locator("#start").click()
    w.wait_text("prune-status", "Pruned")
    assert page.locator("#map-plot .js-plotly-plot").count() == 1
    assert page.locator("#block-plot .js-plotly-plot .bars path").count() >= 2  # one bar per block
    w.shot("02-pruned.png")

    w.fill("prompt", "Hello, who are you?")
    page.locator("#send").click()
    w.wait_text("dense-stats", "done")
    w.wait_text("pruned-stats", "done")
    assert "tok/s" in w.text("dense-stats") and "first token" in w.text("pruned-stats")
    assert page.locator("#dense-chat").inner_text().count("Hello, who are you?") == 1
    assert page.locator("#pruned-chat").inner_text().count("Hello, who are you?") == 1
    w.shot("03-chat.png")

    assert w.outside == [], w.outside
    assert w.errors == [], w.errors


@pytest.fixture
def own_url():
    """A server of the test's own: the module's server caps sessions holding models (4), which the others fill."""
    with serving() as demo:
        yield demo.local_url


def test_a_model_kept_on_disk_prunes_and_chats_and_the_page_says_so(browser, own_url, tiny_model_dir, text_file):
    w = Watched(browser, own_url)
    page = w.page
    page.locator("#source").get_by_text("Local folder", exact=True).click()
    w.fill("folder", tiny_model_dir)
    page.locator("#memory input").click()
    page.get_by_role("option", name="On disk, block by block", exact=True).click()
    page.locator("#load").click()
    w.wait_text("load-status", "Kept on disk, read block by block")
    calibrate_with_text(w, text_file)
    page.locator("#start").click()
    w.wait_text("prune-status", "Pruned")
    w.wait_text("results", "Both models stay on disk")
    w.fill("prompt", "Hello, who are you?")
    page.locator("#send").click()
    w.wait_text("dense-stats", "done")
    w.wait_text("pruned-stats", "done")
    assert w.outside == [], w.outside
    assert w.errors == [], w.errors


def test_builtin_model_preselected_stop_restores(browser, url, builtin_dir):
    """A first-time user: Load (nothing typed), Start, Stop: the page says the dense model is intact."""
    w = Watched(browser, url)
    page = w.page
    page.locator("#load").click()
    w.wait_text("load-status", "Loaded SmolLM2-135M-Instruct")
    w.wait_text("estimate", "Estimate on cpu")
    page.locator("#start").click()
    w.wait_text("prune-status", "/210 (")  # any "linear k/210 (p%)" progress line: pruning is under way
    for button in ("load", "start", "send", "export", "eval"):  # nothing that would disturb the run
        assert page.locator(f"#{button}").is_disabled(), button

    # A second tab's Load waits behind this prune and says so, with its place in the queue; its chat never waits.
    other = Watched(w.page.context.browser, w.page.url)
    other.page.locator("#load").click()
    other.wait_text("load-status", "Waiting for the server")
    other.wait_text("load-status", "queue: 1/1")
    other.shot("06-queued.png")
    page.locator("#stop").click()
    w.wait_text("prune-status", "Stopped")
    assert "dense model was never touched" in w.text("prune-status")
    w.shot("04-stopped.png")
    # Asked after the Stop (Enter, as a newcomer does): the dense model answers, the pruned column says what to do.
    assert page.locator("#send").is_enabled()
    w.fill("prompt", "Hi")
    page.locator("#prompt textarea").press("Enter")
    w.wait_text("pruned-chat", "No pruned model yet: start pruning in step 2")
    w.wait_text("dense-stats", "tok/s")
    other.wait_text("load-status", "Shared read-only with 1 other session")
    assert other.errors == [], other.errors
    assert w.outside == [], w.outside
    assert w.errors == [], w.errors


def test_bad_input_shows_a_message_in_the_page(browser, url, tmp_path, tiny_model_dir, text_file):
    w = Watched(browser, url)
    page = w.page

    def expect_message(text: str) -> None:
        page.get_by_text(text).first.wait_for(timeout=30_000)
        page.keyboard.press("Escape")

    page.locator("#source").get_by_text("Local folder", exact=True).click()
    w.fill("folder", tmp_path)
    page.locator("#load").click()
    expect_message("is not a model folder")
    assert "✗" in w.text("load-status") and "is not a model folder" in w.text("load-status")
    w.shot("05-error.png")
    page.locator("#source").get_by_text("Hugging Face hub", exact=True).click()
    w.fill("hub-id", "nobody/nothing")
    page.locator("#load").click()
    expect_message("not in the local hub cache")

    page.locator("#source").get_by_text("Local folder", exact=True).click()
    w.fill("folder", tiny_model_dir)
    page.locator("#load").click()
    w.wait_text("load-status", "Loaded")
    calibrate_with_text(w, text_file)
    page.locator("#pattern").get_by_text("custom N:M", exact=True).click()
    w.fill("custom-nm", "2:3")
    page.locator("#start").click()
    expect_message("multiple of 3")
    assert "multiple of 3" in w.text("prune-status") and page.locator("#start").is_enabled()
    w.fill("seqlen", 4096)
    page.locator("#pattern").get_by_text("2:4", exact=True).click()
    page.locator("#start").click()
    expect_message("longer than the model's context")
    w.fill("seqlen", 32)
    page.locator("#start").click()
    w.wait_text("prune-status", "Pruned")

    page.locator("#send").click()
    w.wait_text("chat-status", "Type a prompt first")
    assert page.locator("#dense-chat .error, #pruned-chat .error").count() == 0  # no red badges over the chat
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    w.fill("export-dir", full)
    page.locator("#overwrite input").check()
    page.locator("#export").click()
    expect_message("not a previous export")
    page.wait_for_timeout(11_000)  # longer than a toast lasts: the refusal stays in the export step's status line
    assert "not a previous export" in w.text("export-status") and "Replace a previous export" in w.text("export-status")
    assert (full / "keep.txt").read_text() == "precious" and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert "Traceback" not in page.content()
    assert w.outside == [], w.outside
    assert w.errors == [], w.errors



def test_zero_shot_accuracy_fills_a_table_dense_vs_pruned(browser, own_url, tiny_model_dir, text_file, tmp_path):
    from test_zeroshot import write_task

    tasks = write_task(tmp_path / "tasks")
    w = Watched(browser, own_url)
    page = w.page
    page.locator("#source").get_by_text("Local folder", exact=True).click()
    w.fill("folder", tiny_model_dir)
    page.locator("#load").click()
    w.wait_text("load-status", "Loaded")
    assert page.locator("#zero-shot").is_disabled()  # nothing pruned yet
    calibrate_with_text(w, text_file)
    page.locator("#start").click()
    w.wait_text("prune-status", "Pruned")
    w.fill("zs-tasks", "tiny_civics")
    w.fill("zs-dir", tasks)
    w.fill("zs-limit", 0)
    page.locator("#zero-shot").click()
    w.wait_text("zero-shot-status", "difference")
    rows = page.locator("#zero-shot-status table tr")
    assert rows.count() == 3  # the header, the task, the mean
    assert rows.nth(0).inner_text().split() == ["task", "dense", "pruned", "difference"]
    assert rows.nth(1).inner_text().startswith("tiny_civics") and rows.nth(2).inner_text().startswith("mean")
    w.shot("06-zero-shot.png")
    assert page.locator("#zero-shot").is_enabled()
    assert w.outside == [], w.outside
    assert w.errors == [], w.errors
