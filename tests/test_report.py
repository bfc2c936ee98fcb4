"""The HTML report: one self-contained file with the data it claims; results files read defensively."""

import html as html_module
import json
import re

import pytest

from attention_lens.cli import main
from attention_lens.errors import AttentionLensError
from attention_lens.report import read_results
from attention_lens.readings import READING_LABELS
from conftest import make_corpus, make_model_dir
from test_serve import write_effect_files, write_eval


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return make_model_dir(root / "model"), write_eval(root / "eval.json"), root


def embedded_data(html: str) -> dict:
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(block)


def test_report_cli_writes_one_self_contained_file(paths, capsys):
    model, eval_file, root = paths
    out = root / "report.html"
    prompt = "The quick </script><!-- fox"  # must not break out of the data block
    code = main(["report", "--model", str(model), "--lens", "logit", "--eval", str(eval_file), "--prompt", prompt,
                 "-k", "3", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    html = out.read_text()
    assert summary["bytes"] == out.stat().st_size < 200_000
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html)  # nothing fetched from a network
    assert "<script src" not in html and "<link" not in html  # scripts and styles are inline
    assert html.count("</script>") == 2  # the data block and the code block; none from the prompt
    data = embedded_data(html)
    assert data["prompt"]["text"] == prompt
    grid = data["prompt"]
    assert len(grid["cells"]) == len(grid["tokens"]) * 2 * 4 and all(len(top) == 3 for top in grid["cells"].values())
    assert data["results"]["metrics"]["kl"]["1,3"] == pytest.approx(3.3)
    assert data["model"]["model_type"] == "llama" and data["lens"]["kind"] == "logit"
    assert data["reading"]["name"] == grid["reading"] == "raw"  # the logit lens's default, as decode's
    assert html_module.escape(READING_LABELS["raw"]) in html


@pytest.mark.parametrize("reading, value", [("promoted", "promoted"), ("effect", "change")])
def test_report_reading_and_measured_effects(paths, tmp_path, monkeypatch, capsys, reading, value):
    """--reading: the grid holds decode --reading's numbers and the page names the reading; --eval (eval --effects)
    and --effects put each head's effect size, recovered share and true reading in the page."""
    model, _, _ = paths
    monkeypatch.setattr("attention_lens.readings.CACHE_DIR", tmp_path / "cache")
    corpus = str(make_corpus(tmp_path / "corpus"))
    eval_file, effects_file = write_effect_files(tmp_path)
    out = tmp_path / "report.html"
    prompt = "The quick brown fox"
    assert main(["report", "--model", str(model), "--lens", "logit", "--reading", reading, "--prior-data", corpus,
                 "--eval", str(eval_file), "--effects", str(effects_file), "--prompt", prompt, "-k", "3",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reading"] == reading and summary["effects"] == str(effects_file)
    html = out.read_text()
    assert html_module.escape(READING_LABELS[reading]) in html
    data = embedded_data(html)
    assert data["reading"] == {"name": reading, "label": READING_LABELS[reading]}
    assert main(["decode", "--model", str(model), "--lens", "logit", "--reading", reading, "--prior-data", corpus,
                 "--json", "-k", "3", "--position", "all", prompt]) == 0
    decoded = json.loads(capsys.readouterr().out)
    grid = data["prompt"]
    assert grid["reading"] == reading and len(grid["cells"]) == len(decoded["heads"])
    for record in decoded["heads"]:
        cell = grid["cells"][f"{record['position']},{record['layer']},{record['head']}"]
        assert [entry[0] for entry in cell] == [e["id"] for e in record["top"]]
        assert [entry[2] for entry in cell] == pytest.approx([e[value] for e in record["top"]], abs=1e-4)
    effect = data["results"]["effects"]["1,2"]
    assert (effect["effect_kl"], effect["effect_kl_low"], effect["effect_kl_high"]) == (0.0876, 0.0612, 0.1093)
    assert (effect["recovered"], effect["recovered_low"], effect["recovered_high"]) == (0.4242, 0.3131, 0.5353)
    assert effect["raises"][0] == {"token": " Paris", "change": 0.7311}
    assert effect["lowers"][0] == {"token": " London", "change": -0.5122}
    assert data["results"]["summary"]["effects.effect_kl_mean"] == 0.05


def test_report_without_results_or_prompt(paths, capsys):
    model, _, root = paths
    out = root / "bare.html"
    assert main(["report", "--model", str(model), "--lens", "dla", "--prompt", "", "--out", str(out)]) == 0
    data = embedded_data(out.read_text())
    assert data["prompt"] is None and data["results"] is None and data["lens"]["kind"] == "dla"


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('{"summary": {}}', "'heads' list"),
    ('{"heads": [{"layer": 0}]}', "integer 'layer' and 'head'"),
    ('{"heads": [{"layer": 9, "head": 0}]}', "2 layers x 4 heads"),
])
def test_bad_results_file_is_one_line(paths, capsys, content, message):
    model, _, root = paths
    bad = root / "bad.json"
    bad.write_text(content)
    code = main(["report", "--model", str(model), "--eval", str(bad), "--out", str(root / "x.html")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("option, content, message", [
    ("--effects", "{", "not valid JSON"),
    ("--effects", '{"summary": {}}', "as `effects --json` writes"),
    ("--effects", '{"heads": [{"layer": 0, "head": 0}]}', "no numeric 'effect_kl'"),
    ("--effects", '{"heads": [{"layer": 0, "head": 0, "effect_kl": "big"}]}', "no numeric 'effect_kl'"),
    ("--effects", '{"heads": [{"layer": 0, "head": 0, "effect_kl": 0.1, "raises": [" the"]}]}', "'raises' must be"),
    ("--effects", '{"heads": [{"layer": 5, "head": 0, "effect_kl": 0.1}]}', "2 layers x 4 heads"),
    ("--eval", '{"heads": [{"layer": 0, "head": 0, "effect": 0.3}]}', "'effect' that is not an object"),
])
def test_bad_effects_file_is_one_line(paths, capsys, option, content, message):
    model, _, root = paths
    bad = root / "bad-effects.json"
    bad.write_text(content)
    out = root / "never.html"
    code = main(["report", "--model", str(model), option, str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_missing_effect_keys_are_omitted(tmp_path):
    """An effects file with only `effect_kl`, an eval record without intervals: no made-up numbers."""
    effects = tmp_path / "effects.json"
    effects.write_text(json.dumps({"heads": [{"layer": 0, "head": 1, "effect_kl": 0.5},
                                             {"layer": 1, "head": 0, "effect_kl": None}]}))
    evaluated = tmp_path / "eval.json"
    evaluated.write_text(json.dumps({"heads": [{"layer": 0, "head": 1, "kl": 1.0, "effect": {"recovered": 0.25}},
                                               {"layer": 0, "head": 2, "kl": 1.0}]}))
    results = read_results([evaluated], 2, 4, effects=effects)
    assert results.effects == {"0,1": {"recovered": 0.25, "effect_kl": 0.5}}
    assert results.metrics["effect_kl"] == {"0,1": 0.5}
    assert results.to_json()["effects"] == results.effects


def test_results_are_merged_and_read_defensively(tmp_path):
    first = tmp_path / "eval.json"
    first.write_text(json.dumps({"summary": {"kl_mean": 4.0, "nested": {"x": 1}}, "heads": [
        {"layer": 0, "head": 1, "kl": {"mean": 2.0, "ci": [1.5, 2.5]}, "baselines": {"logit": {"mean": 5.0}},
         "flag": True, "ci": [1, 2], "top_tokens": ["a", "b"]},
    ]}))
    second = tmp_path / "specialize.json"
    second.write_text(json.dumps({"heads": [
        {"layer": 0, "head": 1, "entropy": 1.25, "promoted": [{"token": "9"}, {"token": "7"}],
         "description": "numbers"},
    ]}))
    results = read_results([first, second], n_layers=2, n_heads=4)
    assert results.default_metric() == "kl.mean"
    assert results.metrics["kl_gain_vs_logit"] == {"0,1": 3.0}
    assert results.metrics["entropy"] == {"0,1": 1.25}
    assert "flag" not in results.metrics and "ci" not in results.metrics
    assert results.tokens["0,1"] == ["9", "7"]  # the later file's promoted tokens win
    assert results.notes["0,1"] == {"description": "numbers"}
    assert results.summary == {"kl_mean": 4.0}
    assert results.sources == ["eval.json", "specialize.json"]


def test_missing_results_file(tmp_path):
    with pytest.raises(AttentionLensError, match="does not exist"):
        read_results([tmp_path / "none.json"], 2, 4)


def test_a_report_needs_no_web_server_packages():
    """The main job's set-up installs no web extra: writing a report must not import starlette or uvicorn."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
            "from attention_lens.report import _fill_template\n"
            "page = _fill_template('t', {'x': 1})\n"
            "assert '<svg' in page or 'function' in page\n"
            "assert 'attention_lens.web.app' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
