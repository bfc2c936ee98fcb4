"""The explorer's concept box: POST /api/concept ranks the heads whose lens promotes the concept on a prompt."""

from starlette.testclient import TestClient

from attention_lens.lens import Lens
from attention_lens.web import create_app
from test_lens import TARGET_TOKEN, WRITER_HEAD, WRITER_LAYER, make_token_writer


def test_concept_box_finds_the_head_that_writes_the_concept():
    model = make_token_writer()
    word = model.token_text(TARGET_TOKEN)  # the byte tokenizer's single-character token
    client = TestClient(create_app(model, Lens.logit(model)))
    answer = client.post("/api/concept", json={"text": "any prompt at all", "concept": word}).json()
    assert TARGET_TOKEN in answer["concept"]["ids"]
    assert (answer["top"][0]["layer"], answer["top"][0]["head"]) == (WRITER_LAYER, WRITER_HEAD)
    assert len(answer["scores"]) == model.n_layers * model.n_heads


def test_concept_box_refuses_bad_requests_and_never_reads_files():
    model = make_token_writer()
    client = TestClient(create_app(model, Lens.logit(model)))
    assert client.post("/api/concept", json={"text": "hi", "concept": ""}).status_code == 422
    assert client.post("/api/concept", json={"text": "hi"}).status_code == 422
    # A path is a word here, not a file to open (the CLI's --concept may name a file; the web must not).
    answer = client.post("/api/concept", json={"text": "hi", "concept": "/etc/passwd"})
    assert answer.status_code in (200, 422)
    if answer.status_code == 200:
        assert answer.json()["concept"]["words"] == ["/etc/passwd"]
