"""End to end in Debian's Chromium (headless, via Playwright): the explorer page and the HTML report.

Screenshots of each view land in artifacts/ (gitignored) for a person to look at.
"""

import json
import shutil
from pathlib import Path

import pytest

from attention_lens import load_model
from attention_lens.cli import main
from attention_lens.lens import Lens
from attention_lens.readings import READING_LABELS
from attention_lens.report import read_results
from attention_lens.web import create_app
from conftest import make_corpus, make_model_dir
from live_server import live_server
from test_serve import write_effect_files, write_eval

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
PROMPT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("the browser tests need Debian's chromium: apt-get install -y chromium (scripts/setup_test.sh does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.close()
    assert not errors, errors  # no JavaScript exception on the way


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    return make_model_dir(root / "model"), write_eval(root / "eval.json"), root


@pytest.fixture(scope="module")
def server(files):
    model_dir, eval_file, root = files
    model = load_model(str(model_dir))
    _, effects_file = write_effect_files(root)
    results = read_results([eval_file], model.n_layers, model.n_heads, effects=effects_file)
    corpus = str(make_corpus(root / "corpus"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("attention_lens.readings.CACHE_DIR", root / "cache")
        with live_server(create_app(model, Lens.logit(model), results, prior_data=corpus)) as url:
            yield url, model


def test_explorer_prompt_grid_and_head(server, page):
    url, model = server
    page.goto(url)
    page.wait_for_selector("#subtitle:has-text('logit lens')")
    page.fill("#prompt", PROMPT)
    page.fill("#k", "4")
    page.click("#run")
    page.wait_for_selector("table.grid td.cell")
    n_tokens = model.encode(PROMPT).shape[1]
    assert page.locator("table.grid td.cell").count() == model.n_layers * model.n_heads
    assert page.locator("#positions .chip").count() == n_tokens
    assert page.locator("#positions .chip.selected").get_attribute("data-position") == str(n_tokens - 1)
    assert "tokens" in page.inner_text("#status")

    expected = _api(page, url, {"text": PROMPT, "k": 4, "position": "all"})
    record = next(r for r in expected["heads"] if (r["layer"], r["head"], r["position"]) == (1, 2, n_tokens - 1))
    page.click("table.grid td.cell[data-layer='1'][data-head='2']")
    page.wait_for_selector("#attention svg rect")
    assert page.inner_text("#head-title").startswith("Layer 1, head 2")
    shown = page.locator("#topk .tok").all_inner_texts()
    assert shown == [_visible(e["token"]) for e in record["top"]]  # the API's top-k, in order
    # the causal attention matrix: one cell per (query, key <= query), plus the outline of the chosen row
    assert page.locator("#attention svg rect").count() == n_tokens * (n_tokens + 1) // 2 + 1
    assert "kl_gain_vs_logit" in page.inner_text("#head-results")
    assert page.locator("#heatmap svg.heatmap rect.cell").count() == model.n_layers * model.n_heads
    assert page.inner_text("#reading-label") == READING_LABELS["raw"]
    # the effects file: each head's effect size next to the metric's heatmap, its true reading in the panel
    assert page.locator("#effect-heatmap svg.heatmap rect.cell").count() == model.n_layers * model.n_heads
    assert "KL 0.0876 nats when removed [0.0612, 0.1093]" in page.inner_text("#head-results")
    assert "·Paris +0.731" in page.inner_text("#head-results")

    page.click("#positions .chip[data-position='1']")  # another position keeps the head selected
    page.wait_for_selector("#head-title:has-text('position 1')")

    # The concept box: a heatmap of every head's lift, the heads that promote the concept listed first.
    page.fill("#concept", "fox, dog")
    page.click("#concept-run")
    page.wait_for_selector("#concept-heatmap svg.heatmap rect.cell")
    assert page.locator("#concept-heatmap svg.heatmap rect.cell").count() == model.n_layers * model.n_heads
    answer = _api(page, url, {"text": PROMPT, "concept": "fox, dog"}, path="/api/concept")
    best = answer["top"][0]
    assert page.inner_text("#concept-top").startswith(f"head {best['layer']}.{best['head']}")

    # Another reading: the grid is decoded again under it and says so; the numbers are logit changes.
    page.select_option("#reading", "effect")
    page.wait_for_selector(f"#reading-label:has-text('{READING_LABELS['effect'][:20]}')")
    expected = _api(page, url, {"text": PROMPT, "k": 4, "position": "all", "reading": "effect"})
    best = next(r for r in expected["heads"] if (r["layer"], r["head"], r["position"]) == (0, 1, n_tokens - 1))
    cell = page.locator("table.grid td.cell[data-layer='0'][data-head='1']")
    assert cell.locator(".tok").inner_text() == _visible(best["top"][0]["token"])
    assert cell.locator(".p").inner_text() == f"{best['top'][0]['change']:+.2f}"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)


def test_explorer_shows_the_servers_error(server, page):
    url, _ = server
    page.goto(url)
    page.wait_for_selector("#subtitle:has-text('logit lens')")
    page.fill("#prompt", "x" * 2500)
    page.click("#run")
    page.wait_for_selector("#status.error")
    assert "limit is 2000" in page.inner_text("#status")


def test_report_heatmap_and_grid(files, page, capsys):
    model_dir, eval_file, root = files
    out = root / "report.html"
    assert main(["report", "--model", str(model_dir), "--eval", str(eval_file), "--prompt", PROMPT, "--out", str(out)]) == 0
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(out.as_uri())
    cells = page.locator("#heatmap svg.heatmap rect.cell")
    cells.first.wait_for()
    assert cells.count() == 2 * 4
    fills = {cells.nth(i).get_attribute("fill") for i in range(cells.count())}
    assert len(fills) > 1  # coloured by value, not all one colour
    cells.nth(6).hover()  # layer 1, head 2
    tooltip = page.inner_text("#lv-tooltip")
    assert "layer 1, head 2" in tooltip and "kl: 3.20" in tooltip and "·the" in tooltip
    page.select_option("#metric", "kl_gain_vs_logit")
    assert page.inner_text("#metric-note").startswith("(logit-lens KL minus")
    page.click("table.grid td.cell[data-layer='0'][data-head='3']")
    page.wait_for_selector("#topk .tok")
    assert page.locator("#topk .tok").count() == 5 and page.inner_text("#head-title") == "Layer 0, head 3"
    assert "llama" in page.inner_text("#fingerprint")
    assert requests == [out.as_uri()]  # nothing else fetched: the file is self-contained
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)


def test_report_reading_and_effects(files, page, tmp_path, monkeypatch, capsys):
    """--reading effect and the effect files: the page names the reading, shows signed changes, and each head's
    measured effect in a second heatmap, its tooltip and the head panel."""
    model_dir, _, root = files
    monkeypatch.setattr("attention_lens.readings.CACHE_DIR", tmp_path / "cache")
    eval_file, effects_file = write_effect_files(tmp_path)
    out = tmp_path / "report.html"
    assert main(["report", "--model", str(model_dir), "--reading", "effect", "--prior-data",
                 str(make_corpus(tmp_path / "corpus")), "--eval", str(eval_file), "--effects", str(effects_file),
                 "--prompt", PROMPT, "--out", str(out)]) == 0
    page.goto(out.as_uri())
    cells = page.locator("#effect-heatmap svg.heatmap rect.cell")
    cells.first.wait_for()
    assert page.inner_text("#reading-label") == READING_LABELS["effect"]
    assert "logit change" in page.inner_text("#colour-note")
    assert cells.count() == 2 * 4 and page.input_value("#effect-metric") == "effect recovered"
    cells.nth(6).hover()  # layer 1, head 2
    tooltip = page.inner_text("#lv-tooltip")
    assert "effect recovered: 0.424 [0.313, 0.535] (dla -0.071)" in tooltip
    assert "effect size: KL 0.0876 nats when removed [0.0612, 0.1093]" in tooltip
    assert "raises (true reading): ·Paris +0.731" in tooltip
    cells.nth(1).hover()  # head 0.1: its recovered is null, so only the heatmap's own line names it
    tooltip = page.inner_text("#lv-tooltip")
    assert "effect recovered: –" in tooltip and tooltip.count("effect recovered") == 1
    page.click("table.grid td.cell[data-layer='1'][data-head='2']")
    page.wait_for_selector("#topk .tok")
    assert all(text[0] in "+-" for text in page.locator("#topk .pct").all_inner_texts())  # changes, not percents
    assert "lowers (true reading)" in page.inner_text("#head-results")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-effects.png"), full_page=True)


def test_report_marks_heads_whose_effect_reading_missed_on_held_back_text(files, page, tmp_path, monkeypatch):
    """An effect lens fitted in the KL's metric keeps each head's held-back share: the report's grid marks the heads
    under results.UNREAD_SHARE with "?" and says why in the cell's tooltip; the others are unmarked."""
    model_dir, _, _ = files
    monkeypatch.setattr("attention_lens.readings.CACHE_DIR", tmp_path / "cache")
    lens = Lens.from_model(load_model(str(model_dir)), "effect")
    lens.config.training = {"fit_choice": {"held_back_recovered_by_head": {"1.2": 0.01, "0.1": 0.5}}}
    lens.save(tmp_path / "lens")
    out = tmp_path / "report.html"
    assert main(["report", "--model", str(model_dir), "--lens", str(tmp_path / "lens"), "--prior-data",
                 str(make_corpus(tmp_path / "corpus")), "--prompt", PROMPT, "--out", str(out)]) == 0
    page.goto(out.as_uri())
    page.wait_for_selector("table.grid td.cell")
    marked = page.locator("table.grid td.cell:has(span.unread)")
    assert marked.count() == 1
    assert (marked.get_attribute("data-layer"), marked.get_attribute("data-head")) == ("1", "2")
    assert "under 5.0% of the head's measured effect on held-back text" in marked.get_attribute("title")
    assert "held-back" not in page.locator("table.grid td.cell[data-layer='0'][data-head='1']").get_attribute("title")


def _api(page, url, body, path="/api/decode"):
    answer = page.request.post(url + path, data=json.dumps(body), headers={"Content-Type": "application/json"})
    assert answer.ok
    return answer.json()


def _visible(token):
    return token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"
