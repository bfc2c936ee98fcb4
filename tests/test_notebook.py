"""Notebook display: HTML grids, plotly heatmaps and tidy rows of decode / eval / specialize / search results."""

import html
import json
import re
import sys
from pathlib import Path

import pytest

import attention_lens as al
from attention_lens import DataConfig, Lens
from attention_lens.concepts import Concept, search
from attention_lens.evaluate import EvalConfig, evaluate
from attention_lens.specialize import SpecializeConfig, specialize
from conftest import make_corpus, make_tiny_model

SEQ_LEN = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    corpus = make_corpus(tmp_path_factory.mktemp("notebook") / "corpus")
    return DataConfig(data=str(corpus), seq_len=SEQ_LEN, holdout=0.25)


def cells(page: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", page)


def test_decode_shows_a_layers_by_heads_grid_of_top_tokens(model):
    result = al.decode(model, Lens.logit(model), "a <b> & c", k=3)
    page = result._repr_html_()
    assert page.count("<tr>") == 1 + model.n_layers  # header + one row per layer
    shown = cells(page)
    assert len(shown) == model.n_layers * model.n_heads
    for record in result.heads:  # every head's top token and probability, tokens escaped
        best = record.top[0]
        label = al.notebook.visible(best.token)
        assert any(html.escape(label[:5]) in cell and f"{best.prob:.0%}" in cell for cell in shown)
    assert "<script" not in page and "http" not in page  # self-contained: nothing fetched


def test_decode_grid_at_another_position_and_a_position_not_decoded(model):
    result = al.decode(model, Lens.logit(model), "abcdef", k=2, position="all")
    grid = result.grid(position=2)
    assert len(grid.cells) == model.n_layers * model.n_heads and "position 2" in grid.title
    one = al.decode(model, Lens.logit(model), "abcdef", k=2)
    with pytest.raises(al.AttentionLensError, match="was not decoded"):
        one.grid(position=0)


def test_decode_records_are_tidy_and_match_the_json(model):
    result = al.decode(model, Lens.logit(model), "abcd", k=4, position="all")
    rows = result.to_records()
    assert len(rows) == model.n_layers * model.n_heads * 4 * 4  # layers x heads x positions x k
    assert all(set(row) == {"layer", "head", "position", "position_token", "rank", "token", "id", "logit", "prob"}
               for row in rows)
    first = result.heads[0]
    assert rows[0]["token"] == first.top[0].token and rows[0]["rank"] == 0
    frame = result.to_pandas()
    assert len(frame) == len(rows) and frame.groupby(["layer", "head", "position"]).size().eq(4).all()


def test_plot_is_a_plotly_heatmap_with_top_k_hover(model):
    result = al.decode(model, Lens.logit(model), "abcd", k=3)
    figure = result.plot()
    heatmap = figure.data[0]
    assert heatmap.type == "heatmap"
    assert len(heatmap.z) == model.n_layers and len(heatmap.z[0]) == model.n_heads
    record = next(r for r in result.heads if (r.layer, r.head) == (1, 2))
    assert heatmap.z[1][2] == record.top[0].prob
    hover = heatmap.customdata[1][2]
    assert hover.count("<br>") == 3  # the head's name, then its top-3 tokens
    assert all(al.notebook.visible(t.token) in hover for t in record.top)


def test_missing_plotly_or_pandas_says_which_extra_to_install(model, monkeypatch):
    result = al.decode(model, Lens.logit(model), "abcd", k=2)
    for module in ("plotly", "plotly.graph_objects", "pandas"):
        monkeypatch.setitem(sys.modules, module, None)  # what an import of a missing package sees
    with pytest.raises(al.AttentionLensError, match=r"attention-lens\[notebook\]"):
        result.plot()
    with pytest.raises(al.AttentionLensError, match=r"attention-lens\[notebook\]"):
        result.to_pandas()


def test_eval_specialize_and_search_results_show_grids_and_rows(model, data):
    lens = Lens.logit(model)
    evaluation = evaluate(lens, data, EvalConfig(tokens=64, constant_tokens=64, bootstrap=10, block_rows=64))
    specialization = specialize(lens, data, SpecializeConfig(tokens=64))
    found = search(lens, Concept(words=["x"], ids=[17, 40]), data, tokens=64)
    n_heads = model.n_layers * model.n_heads
    for result in (evaluation, specialization, found):
        page = result._repr_html_()
        assert len(cells(page)) == n_heads, type(result).__name__
        assert len(result.plot().data[0].z) == model.n_layers
        assert len(result.to_pandas()) == len(result.to_records()) > 0
    kl = {(r["layer"], r["head"]): r["kl"] for r in evaluation.to_records()}
    assert kl == {(r.layer, r.head): r.kl for r in evaluation.heads}
    assert f"{evaluation.head(1, 3).kl:.2f}" in cells(evaluation._repr_html_())[model.n_heads + 3]
    assert {row["id"] for row in found.to_records()} == {17, 40}
    assert len(specialization.to_records()) == sum(len(r.promoted) for r in specialization.heads)


def test_quickstart_notebook_runs_headless_and_shows_the_grid(tmp_path):
    """examples/quickstart.ipynb, executed in a fresh kernel as a user would, on the real SmolLM2."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    path = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # shipped clean
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [cell.outputs for cell in notebook.cells if cell.cell_type == "code"]
    assert not [o for cell in outputs for o in cell if o.output_type == "error"]

    def shown(index: int, mime: str) -> str:
        data = [o["data"][mime] for o in outputs[index] if mime in o.get("data", {})]
        assert data, f"cell {index} shows no {mime}"
        return data[0] if isinstance(data[0], str) else json.dumps(data[0])

    assert "30 layers x 9 heads" in "".join(o.get("text", "") for o in outputs[0])
    grid = shown(1, "text/html")
    assert "attention-lens-grid" in grid and grid.count("<tr>") == 31 and len(cells(grid)) == 270
    figure = json.loads(shown(2, "application/vnd.plotly.v1+json"))
    assert figure["data"][0]["type"] == "heatmap" and len(figure["data"][0]["z"]) == 30
    assert "<table" in shown(3, "text/html") and "prob" in shown(3, "text/html")
    printed = "".join(o.get("text", "") for cell in outputs[4:] for o in cell)
    assert "(1, 5, 9, 64) -> (1, 5, 9, 49152)" in printed
    assert "['README.md', 'config.json', 'lens.safetensors']" in printed and "logit attention lens for smollm2-135m" in printed
