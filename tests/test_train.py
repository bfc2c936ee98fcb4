"""Training lowers held-out KL; checkpoints resume to the same result; training refuses bad setups."""

import pytest
import torch

from attention_lens import AttentionLensError, DataConfig, Lens, TrainConfig, heldout_kl, load_model, train
from conftest import make_corpus, make_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = load_model(str(make_model_dir(root / "model")))
    data = DataConfig(data=str(make_corpus(root / "corpus")), seq_len=16, holdout=0.25)
    return model, data


def test_training_lowers_heldout_kl(setup):
    model, data = setup
    lens = Lens.from_model(model, "affine")
    before = heldout_kl(lens, data, tokens=256)
    train(lens, data, TrainConfig(tokens=2048, batch_size=4, lr=1e-2))
    after = heldout_kl(lens, data, tokens=256)
    assert after.kl.shape == (model.n_layers, model.n_heads)
    training = lens.config.training  # recorded by the library, not only by the CLI
    assert training["method"] == "train" and training["split"] == "train" and training["data"]["data"] == data.data
    assert training["tokens_seen"] >= 2048 and training["seed"] == 0 and training["lr"] == 1e-2
    assert (after.kl < before.kl).all(), (before.kl, after.kl)
    assert after.mean < 0.8 * before.mean


def test_full_lens_trains_too(setup):
    model, data = setup
    lens = Lens.from_model(model, "full", layers=[1], heads=[1])
    before = heldout_kl(lens, data, tokens=128).mean
    train(lens, data, TrainConfig(tokens=1024, lr=1e-2, dtype="bfloat16"))
    assert heldout_kl(lens, data, tokens=128).mean < before


def test_resume_refuses_checkpoint_of_a_different_run(setup, tmp_path):
    model, data = setup
    config = TrainConfig(tokens=2 * 64, batch_size=4, lr=1e-2, checkpoint_every=1)
    train(Lens.from_model(model, "affine", layers=[0]), data, config, out=tmp_path / "run")
    other = TrainConfig(**{**config.__dict__, "lr": 1e-3})
    with pytest.raises(AttentionLensError, match="different run.*lr"):
        train(Lens.from_model(model, "affine", layers=[0]), data, other, out=tmp_path / "run", resume=True)


def test_killed_run_resumes_bit_identically(setup, tmp_path):
    """Stop a run after some steps (as a kill would, leaving only the checkpoint) and resume it."""
    model, data = setup
    config = TrainConfig(tokens=6 * 64, batch_size=4, lr=1e-2, checkpoint_every=1)
    straight = Lens.from_model(model, "affine", layers=[0])
    train(straight, data, config, out=tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_after_three(report):
        if report.step == 3:
            raise Killed

    victim = Lens.from_model(model, "affine", layers=[0])
    with pytest.raises(Killed):
        train(victim, data, config, out=tmp_path / "victim", on_step=kill_after_three)
    resumed = Lens.from_model(model, "affine", layers=[0])
    progress = train(resumed, data, config, out=tmp_path / "victim", resume=True)
    assert progress.step == 6
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_untrainable_kind_is_refused(setup):
    model, data = setup
    with pytest.raises(AttentionLensError, match="no parameters"):
        train(Lens.logit(model), data, TrainConfig(tokens=10))


def test_paper_objective_trains_the_summed_heads(setup):
    """The original objective lowers the KL of the layer's summed lens logits at the last position."""
    from attention_lens.heads import run_with_heads
    from attention_lens.objective import target_distribution

    model, data = setup
    lens = Lens.from_model(model, "affine", layers=[1])
    batch = torch.randint(0, model.vocab, (8, 16))

    @torch.no_grad()
    def summed_kl():
        logits, capture = run_with_heads(model, batch, [1])
        p, neg_entropy = target_distribution(logits[:, -1])
        summed = lens.logits(capture.heads[1].z[:, -1], 1).sum(-2)
        return float((neg_entropy - (p * summed).sum(-1) + torch.logsumexp(summed, -1)).mean())

    before = summed_kl()
    train(lens, data, TrainConfig(tokens=4096, lr=1e-2, objective="paper"))
    assert summed_kl() < before
