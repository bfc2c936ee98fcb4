"""Hugging Face-style lens folders: config.json, *.safetensors and a model card; Hub ids refused offline."""

import pytest
import torch

from attention_lens import AttentionLensError, Lens
from attention_lens.hub import _ranges, model_card
from conftest import make_tiny_model


def trained_looking_lens():
    """An affine lens with non-zero parameters and the training record `train` would leave."""
    model = make_tiny_model("llama")
    lens = Lens.from_model(model, "affine", layers=[1], heads=[0, 1, 3])
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter.normal_()
    lens.config.training = {"data": {"data": "sotu", "seq_len": 128, "holdout": 0.1}, "optimizer": "adam",
                            "lr": 0.001, "tokens_seen": 20480, "steps": 40, "final_loss": 3.25}
    return model, lens


def test_save_pretrained_writes_the_hub_layout_and_reads_back_the_same_lens(tmp_path):
    model, lens = trained_looking_lens()
    lens.save_pretrained(tmp_path / "lens", evaluation={"heldout_kl": 1.5, "heldout_kl_logit": 2.75})
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["README.md", "config.json", "lens.safetensors"]
    loaded = Lens.from_pretrained(tmp_path / "lens", model)
    for name, tensor in lens.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    z = torch.randn(5, model.n_heads, model.d_head)
    torch.testing.assert_close(loaded.logits(z, 1), lens.logits(z, 1), atol=0, rtol=0)


def test_model_card_says_model_data_tokens_and_numbers(tmp_path):
    model, lens = trained_looking_lens()
    card = (lens.save_pretrained(tmp_path, evaluation={"heldout_kl": 1.5, "heads": 27}) / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: attention-lens\n")
    assert f"`{model.name}` (llama, 2 layers x 4 heads" in card
    assert "| layers | 1 |" in card and "| heads per layer | 0-1, 3 |" in card
    assert "`sotu` (windows of 128 tokens" in card and "| tokens seen | 20,480 |" in card
    assert "| final_loss | 3.25 |" in card and "| heldout_kl | 1.5 |" in card and "| heads | 27 |" in card
    assert "al.Lens.from_pretrained(" in card


def test_untrained_lens_card_has_no_training_numbers():
    model = make_tiny_model("gpt2")
    card = model_card(Lens.logit(model).config)
    assert "needs no training" in card and "## Evaluation" not in card
    assert "| layers | all 2 |" in card


def test_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8], 10) == "0-2, 5, 7-8"
    assert _ranges([0, 1], 2) == "all 2"


def test_hub_id_offline_fails_with_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so that no local folder of that name exists
    with pytest.raises(AttentionLensError, match="not a local lens directory.*Hugging Face Hub cannot be reached"):
        Lens.from_pretrained("attention-lens-tests/no-such-lens")


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(AttentionLensError, match="does not exist"):
        Lens.from_pretrained(tmp_path / "nowhere" / "lens")
