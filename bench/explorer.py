"""Measure the report and the explorer on SmolLM2: report size and build time, API latency, page load.

    .venv/bin/python bench/explorer.py [--screenshots docs/]

Per-head results for the heatmap come from `heldout_kl` (the lens, and the logit and DLA lenses as
baselines) on a few held-out SOTU tokens, written in the `eval --json` shape.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import httpx  # noqa: E402

import attention_lens as al  # noqa: E402
from attention_lens.report import build_report, read_results, write_report  # noqa: E402
from attention_lens.web import create_app  # noqa: E402
from live_server import live_server  # noqa: E402

PROMPT = "The capital of France is Paris, and the capital of Italy is"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def eval_results(model, lens_kind: str, directory: Path, tokens: int) -> Path:
    """Held-out per-head KL of the lens and of the logit and DLA baselines, in the `eval --json` shape."""
    data = al.DataConfig(data="sotu", seq_len=64)
    kinds = dict.fromkeys([lens_kind, "logit", "dla"])
    kl = {kind: al.heldout_kl(al.Lens.from_model(model, kind), data, tokens).kl for kind in kinds}
    heads = [{"layer": l, "head": h, "kl": round(float(kl[lens_kind][l, h]), 4),
              **{f"kl_{kind}": round(float(kl[kind][l, h]), 4) for kind in kinds if kind != lens_kind}}
             for l in range(model.n_layers) for h in range(model.n_heads)]
    path = directory / "eval.json"
    path.write_text(json.dumps({"summary": {"kl_mean": round(float(kl[lens_kind].mean()), 4), "tokens": tokens,
                                            "lens": lens_kind, "data": "sotu (held out)"}, "heads": heads}))
    return path


def timed(function, repeats: int = 5) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--screenshots", type=Path, help="Write explorer.png and report.png here.")
    parser.add_argument("--eval-tokens", type=int, default=128)
    parser.add_argument("--lens", default="logit", choices=["logit", "dla"])
    parser.add_argument("--repeats", type=int, default=5, help="Timings are the median of this many runs.")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp())
    started = time.perf_counter()
    model = al.load_model("smollm2-135m")
    print(f"model load: {time.perf_counter() - started:.1f} s")
    lens = al.Lens.from_model(model, args.lens)
    results = None
    if args.eval_tokens > 0:
        results = read_results([eval_results(model, args.lens, directory, args.eval_tokens)], model.n_layers, model.n_heads)

    seconds, html = timed(lambda: build_report(model, lens, PROMPT, results, k=5), repeats=min(3, args.repeats))
    report = write_report(directory / "report.html", html)
    print(f"report: {report.stat().st_size / 1024:.0f} KiB, built in {seconds:.2f} s "
          f"({len(model.encode(PROMPT)[0])} prompt tokens, 270 heads, k=5)")

    with live_server(create_app(model, lens, results)) as url:
        for k in (5, 10):
            body = {"text": PROMPT, "k": k, "position": "all"}
            seconds, answer = timed(lambda: httpx.post(f"{url}/api/decode", json=body, timeout=120), args.repeats)
            print(f"POST /api/decode k={k}, all positions: {seconds * 1000:.0f} ms median, "
                  f"{len(answer.content) / 1024:.0f} KiB")
        body = {"text": PROMPT, "k": 10, "position": -1}
        seconds, _ = timed(lambda: httpx.post(f"{url}/api/decode", json=body, timeout=120), args.repeats)
        print(f"POST /api/decode k=10, last position: {seconds * 1000:.0f} ms median")
        seconds, _ = timed(lambda: httpx.post(f"{url}/api/attention", json={"text": PROMPT, "layer": 3, "head": 4},
                                              timeout=120), repeats=min(3, args.repeats))
        print(f"POST /api/attention (cached prompt): {seconds * 1000:.0f} ms median")
        browser_timings(url, report, args.screenshots)


def browser_timings(url: str, report: Path, screenshots: Path | None) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 1000})
        started = time.perf_counter()
        page.goto(url)
        page.wait_for_selector("#subtitle:has-text('lens on')")
        print(f"explorer page load (to lens info shown): {(time.perf_counter() - started) * 1000:.0f} ms")
        page.fill("#prompt", PROMPT)
        started = time.perf_counter()
        page.click("#run")
        page.wait_for_selector("table.grid td.cell")
        print(f"explorer prompt -> grid drawn (k=10): {(time.perf_counter() - started) * 1000:.0f} ms")
        started = time.perf_counter()
        page.click("table.grid td.cell[data-layer='27'][data-head='4']")
        page.wait_for_selector("#attention svg rect")
        print(f"explorer click -> attention drawn: {(time.perf_counter() - started) * 1000:.0f} ms")
        if screenshots:
            screenshots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshots / "explorer-full.png"), full_page=True)
            page.locator("#result").screenshot(path=str(screenshots / "explorer.png"))
        started = time.perf_counter()
        page.goto(report.as_uri())
        page.wait_for_selector("table.grid td.cell")
        print(f"report page load (to heatmap and grid drawn): {(time.perf_counter() - started) * 1000:.0f} ms")
        if screenshots:
            if page.locator("#heatmap svg rect.cell").count() > 250:
                page.hover("#heatmap svg rect.cell >> nth=250")
            page.screenshot(path=str(screenshots / "report.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
