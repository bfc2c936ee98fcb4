"""The explorer's JSON API: same document as `decode --json`, 4xx on bad input, no files outside static/."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.testclient import TestClient

from attention_lens import decode, load_model
from attention_lens.cli import main
from attention_lens.lens import Lens
from attention_lens.patterns import attention_patterns
from attention_lens.report import read_results
from attention_lens.web import Limits, create_app
from conftest import make_model_dir
from live_server import live_server

PROMPT = "The quick brown fox"


def write_eval(path, n_layers=2, n_heads=4):
    heads = [{"layer": l, "head": h, "kl": 2.0 + l + h / 10, "kl_logit": 3.0 + h, "top1": 0.1 * h,
              "promoted": [{"token": " the", "count": 3}, {"token": "fox", "count": 1}], "description": "names"}
             for l in range(n_layers) for h in range(n_heads)]
    path.write_text(json.dumps({"summary": {"kl_mean": 2.5, "frac_beats_logit": 0.75}, "heads": heads}))
    return path


def write_effect_files(root, n_layers=2, n_heads=4):
    """By hand, as `eval --effects --json` and `effects --json` write them: (eval file, effects file). Head 1.2 has
    numbers found nowhere else; head 0.0 has no `effect` and head 0.1 a `recovered` of null (both omitted)."""
    heads = []
    for l in range(n_layers):
        for h in range(n_heads):
            record = {"layer": l, "head": h, "kl": 2.0 + l + h / 10, "top1": 0.1 * h}
            if (l, h) != (0, 0):
                record["effect"] = {"effect_kl": 0.01 * (1 + l + h), "recovered": 0.1 * h, "recovered_low": 0.0,
                                    "recovered_high": 0.2 * h, "corr": 0.5, "top10_agreement": 0.3,
                                    "baselines": {"dla": {"recovered": 0.05}, "zero": {"recovered": 0.0}}}
            heads.append(record)
    heads[1]["effect"]["recovered"] = None
    heads[6]["effect"].update(recovered=0.4242, recovered_low=0.3131, recovered_high=0.5353)
    heads[6]["effect"]["baselines"]["dla"]["recovered"] = -0.0707
    eval_file = root / "eval-effects.json"
    eval_file.write_text(json.dumps({"summary": {"kl_mean": 2.5, "effect_recovered_median": 0.2}, "heads": heads}))
    effects = [{"layer": l, "head": h, "effect_kl": 0.02 * (1 + h), "effect_kl_low": 0.01, "effect_kl_high": 0.1,
                "raises": [{"token": " big", "id": 7, "change": 0.25}], "lowers": [{"token": " small", "id": 8,
                                                                                  "change": -0.2}], "examples": []}
               for l in range(n_layers) for h in range(n_heads)]
    effects[6].update(effect_kl=0.0876, effect_kl_low=0.0612, effect_kl_high=0.1093,
                      raises=[{"token": " Paris", "id": 5, "change": 0.7311}, {"token": " Rome", "id": 6, "change": 0.1}],
                      lowers=[{"token": " London", "id": 9, "change": -0.5122}])
    effects_file = root / "effects.json"
    effects_file.write_text(json.dumps({"summary": {"tokens": 96, "heads": 8, "effect_kl_mean": 0.05},
                                        "heads": effects, "mode": "mean", "data": "sotu"}))
    return eval_file, effects_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_model_dir(root / "model")
    model = load_model(str(model_dir))
    results = read_results([write_eval(root / "eval.json")], model.n_layers, model.n_heads)
    app = create_app(model, Lens.logit(model), results, Limits(max_chars=300, max_tokens=40, max_body_bytes=2048))
    return model, model_dir, app


@pytest.fixture(scope="module")
def client(setup):
    with TestClient(setup[2]) as client:
        yield client


def test_decode_answers_the_cli_document(setup, client, capsys):
    model, model_dir, _ = setup
    answer = client.post("/api/decode", json={"text": PROMPT, "k": 3, "position": "all"})
    assert answer.status_code == 200
    assert main(["decode", "--model", str(model_dir), "--lens", "logit", "--json", "-k", "3", "--position", "all",
                 PROMPT]) == 0
    assert answer.json() == json.loads(capsys.readouterr().out)
    assert len(answer.json()["heads"]) == len(answer.json()["tokens"]) * model.n_layers * model.n_heads


def test_decode_defaults_to_every_position_and_k_10(setup, client):
    document = client.post("/api/decode", json={"text": PROMPT}).json()
    assert document["positions"] == list(range(len(document["tokens"])))
    assert {len(r["top"]) for r in document["heads"]} == {10}


def test_attention_is_the_models_own_pattern(setup, client):
    model = setup[0]
    answer = client.post("/api/attention", json={"text": PROMPT, "layer": 1, "head": 2}).json()
    pattern = answer["pattern"]
    n = len(answer["tokens"])
    assert len(pattern) == n and all(len(row) == n for row in pattern)
    assert all(abs(sum(row) - 1) < 1e-3 for row in pattern)
    assert all(pattern[q][k] == 0 for q in range(n) for k in range(q + 1, n))  # causal
    expected = attention_patterns(model, model.encode(PROMPT))[1, 2]
    assert max(abs(pattern[q][k] - float(expected[q, k])) for q in range(n) for k in range(n)) < 1e-3
    assert model.hf.config._attn_implementation == "sdpa"  # switched back after the eager pass


def test_info_carries_lens_model_and_results(setup, client):
    info = client.get("/api/info").json()
    assert info["lens"]["kind"] == "logit" and info["model"]["w_u_sha256"] == setup[0].fingerprint()["w_u_sha256"]
    assert info["results"]["default_metric"] == "kl"
    assert info["results"]["metrics"]["kl_gain_vs_logit"]["1,2"] == pytest.approx(5.0 - 3.2)
    assert info["results"]["tokens"]["0,0"] == [" the", "fox"]


@pytest.mark.parametrize("path, body, status, message", [
    ("/api/decode", b"{not json", 400, "must be JSON"),
    ("/api/decode", b"[1, 2]", 400, "JSON object"),
    ("/api/decode", b"{}", 422, "'text'"),
    ("/api/decode", b'{"text": "   "}', 422, "'text'"),
    ("/api/decode", b'{"text": "hi", "k": 0}', 422, "'k'"),
    ("/api/decode", b'{"text": "hi", "k": "5"}', 422, "'k'"),
    ("/api/decode", b'{"text": "hi", "k": 51}', 422, "'k'"),
    ("/api/decode", b'{"text": "hi", "position": "last"}', 422, "'position'"),
    ("/api/decode", b'{"text": "hi", "position": 99}', 422, "outside the prompt"),
    ("/api/decode", b'{"text": "hi", "reading": "sideways"}', 422, "'reading' must be one of raw, promoted, effect"),
    ("/api/decode", json.dumps({"text": "x" * 301}).encode(), 413, "characters"),
    ("/api/decode", json.dumps({"text": "ab " * 60}).encode(), 413, "tokens"),
    ("/api/decode", json.dumps({"text": "hi", "pad": "y" * 3000}).encode(), 413, "byte limit"),
    ("/api/attention", b'{"text": "hi", "layer": 2, "head": 0}', 422, "'layer'"),
    ("/api/attention", b'{"text": "hi", "layer": 0}', 422, "'head'"),
])
def test_bad_requests_get_a_clear_4xx(client, path, body, status, message):
    answer = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_wrong_method_and_unknown_path(client):
    assert client.get("/api/decode").status_code == 405
    assert client.get("/api/nothing").status_code == 404


def test_static_files_and_page(client):
    page = client.get("/")
    assert page.status_code == 200 and "explorer.js" in page.text
    assert client.get("/static/grid.js").status_code == 200


@pytest.mark.parametrize("raw_path", [
    "/static/../app.py", "/static/../../cli.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
    "/static/%2e%2e%2f%2e%2e%2fcli.py", "/static//etc/passwd", "/static/....//app.py", "/../../../../etc/passwd",
])
def test_path_traversal_is_404(setup, raw_path):
    """Raw request lines on a real server: an HTTP client would normalize the dots away."""
    with live_server(setup[2]) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(f"GET {raw_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert b" 404 " in status_line, (raw_path, status_line)
    assert b"def " not in answer and b"root:" not in answer


def test_concurrent_requests_all_answered_one_model_call_at_a_time(setup):
    model = setup[0]
    in_flight, most = [0], [0]
    guard = threading.Lock()
    original = model.hf.forward

    def slow_forward(*args, **kwargs):
        with guard:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.02)  # long enough that unguarded requests would overlap
        try:
            return original(*args, **kwargs)
        finally:
            with guard:
                in_flight[0] -= 1

    model.hf.forward = slow_forward
    try:
        with live_server(setup[2]) as url:
            def ask(i):
                path, body = (("/api/attention", {"text": f"fox {i}", "layer": 0, "head": 1}) if i % 3 == 0
                              else ("/api/decode", {"text": f"fox {i}", "k": 2}))
                return httpx.post(url + path, json=body, timeout=60)

            with ThreadPoolExecutor(12) as pool:
                answers = list(pool.map(ask, range(12)))
    finally:
        del model.hf.forward
    assert [a.status_code for a in answers] == [200] * 12
    assert [a.json().get("text") for a in answers if "text" in a.json()] == [f"fox {i}" for i in range(12) if i % 3]
    assert most[0] == 1


def test_serve_cli_builds_the_app(setup, monkeypatch, capsys):
    import attention_lens.web as web

    served = {}
    monkeypatch.setattr(web, "run_server", lambda app, sock: served.update(app=app, port=sock.getsockname()[1]))
    assert main(["serve", "--model", str(setup[1]), "--lens", "logit", "--port", "0"]) == 0
    assert "http://127.0.0.1:" in capsys.readouterr().err
    with TestClient(served["app"]) as client:
        assert client.post("/api/decode", json={"text": PROMPT, "k": 1}).status_code == 200


def test_serve_cli_busy_port_is_one_line(setup, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = main(["serve", "--model", str(setup[1]), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and "another --port" in err and len(err.strip().splitlines()) == 1


def test_serve_cli_reading_and_effects(setup, tmp_path, monkeypatch, capsys):
    """serve --reading effect: /api/info names the reading and carries each head's measured effect; /api/decode
    answers exactly what `decode --reading effect --json` prints."""
    import attention_lens.web as web
    from attention_lens.readings import READING_LABELS
    from conftest import make_corpus

    monkeypatch.setattr("attention_lens.readings.CACHE_DIR", tmp_path / "cache")
    corpus = str(make_corpus(tmp_path / "corpus"))
    eval_file, effects_file = write_effect_files(tmp_path)
    served = {}
    monkeypatch.setattr(web, "run_server", lambda app, sock: served.update(app=app))
    assert main(["serve", "--model", str(setup[1]), "--lens", "logit", "--port", "0", "--reading", "effect",
                 "--prior-data", corpus, "--eval", str(eval_file), "--effects", str(effects_file)]) == 0
    capsys.readouterr()
    with TestClient(served["app"]) as client:
        info = client.get("/api/info").json()
        answer = client.post("/api/decode", json={"text": PROMPT, "k": 3, "position": "all"}).json()
    assert info["reading"] == {"name": "effect", "label": READING_LABELS["effect"]}
    effects = info["results"]["effects"]
    assert effects["1,2"] == {"effect_kl": 0.0876, "effect_kl_low": 0.0612, "effect_kl_high": 0.1093,
                              "recovered": 0.4242, "recovered_low": 0.3131, "recovered_high": 0.5353, "corr": 0.5,
                              "top10_agreement": 0.3, "dla_recovered": -0.0707,
                              "raises": [{"token": " Paris", "change": 0.7311}, {"token": " Rome", "change": 0.1}],
                              "lowers": [{"token": " London", "change": -0.5122}]}
    assert "recovered" not in effects["0,1"] and "recovered" not in effects["0,0"]  # null / no `effect`: omitted
    assert info["results"]["metrics"]["effect_kl"]["1,2"] == 0.0876
    assert main(["decode", "--model", str(setup[1]), "--lens", "logit", "--reading", "effect", "--prior-data", corpus,
                 "--json", "-k", "3", "--position", "all", PROMPT]) == 0
    assert answer == json.loads(capsys.readouterr().out)
    assert answer["reading"] == "effect" and all("change" in e for r in answer["heads"] for e in r["top"])
    assert info["readings"] == READING_LABELS

    # Another reading on request: its statistics from the server's --prior-data, the same numbers as decode's.
    with TestClient(served["app"]) as client:
        promoted = client.post("/api/decode", json={"text": PROMPT, "k": 3, "reading": "promoted"}).json()
    assert main(["decode", "--model", str(setup[1]), "--lens", "logit", "--reading", "promoted", "--prior-data",
                 corpus, "--json", "-k", "3", "--position", "all", PROMPT]) == 0
    assert promoted == json.loads(capsys.readouterr().out) and promoted["reading"] == "promoted"
