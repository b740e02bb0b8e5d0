"""BayesPrompt pinned by hand: EM recovers well-separated clusters, the mixture's score is the gradient of its
log-density, sampling and SVGD are seeded and do what they claim, and the prompt tokens are the documented function
of the samples; `PromptModel.represent` is the mean embedding of the non-special tokens."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SST_TRAIN

from prompttune import PromptTuneError
from prompttune.api import build_model, init_context, make_config
from prompttune.data.examples import load_examples
from prompttune.methods.base import InitContext
from prompttune.methods.bayesprompt import (
    BayesPrompt,
    BayesPromptConfig,
    Mixture,
    component_log_prob,
    fit_gmm,
    gmm_score,
    sample_gmm,
    svgd,
)
from prompttune.methods.init import vocab_ids

CENTRES = torch.tensor([[-4.0, -4.0, 3.0, 0.0], [4.0, 4.0, -3.0, 1.0]], dtype=torch.float64)


def _two_clusters(n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([c + 0.5 * torch.randn(n, 4, generator=gen, dtype=torch.float64) for c in CENTRES])
    return x, torch.arange(2).repeat_interleave(n)  # (2n, 4), (2n,) true cluster of each point


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "full"])
def test_em_recovers_two_well_separated_clusters(diagonal):
    x, label = _two_clusters()
    gmm, ll = fit_gmm(x, 2, torch.Generator().manual_seed(0), diagonal=diagonal, reg=0.01)
    order = gmm.means[:, 0].argsort()  # component of the left cluster first
    weights, means, covs = gmm.weights[order], gmm.means[order], gmm.covs[order]
    # Separated by ~16 standard deviations: responsibilities are hard, so EM's fixed point is each cluster's own
    # sample mean and (biased) sample covariance plus the regulariser.
    for c in range(2):
        pts = x[label == c]
        torch.testing.assert_close(means[c], pts.mean(0), rtol=0, atol=1e-10)
        centred = pts - pts.mean(0)
        cov = centred.T @ centred / len(pts)
        expect = cov.diagonal() + 0.01 if diagonal else cov + 0.01 * torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(covs[c], expect, rtol=0, atol=1e-10)
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=0, atol=1e-10)
    assert math.isfinite(ll)
    again, _ = fit_gmm(x, 2, torch.Generator().manual_seed(0), diagonal=diagonal, reg=0.01)
    assert all(torch.equal(a, b) for a, b in zip(gmm, again, strict=True)), "same seed, same fit"


def test_component_log_prob_matches_torch_distributions():
    x, _ = _two_clusters(5)
    gmm, _ = fit_gmm(x, 2, torch.Generator().manual_seed(1), diagonal=False, reg=0.1)
    ref = (
        torch.stack(
            [torch.distributions.MultivariateNormal(gmm.means[k], gmm.covs[k]).log_prob(x) for k in range(2)], 1
        )
        + gmm.weights.log()
    )
    torch.testing.assert_close(component_log_prob(x, gmm), ref)
    diag = Mixture(gmm.weights, gmm.means, gmm.covs.diagonal(dim1=-2, dim2=-1))
    ref = (
        torch.stack(
            [torch.distributions.Normal(diag.means[k], diag.covs[k].sqrt()).log_prob(x).sum(-1) for k in range(2)], 1
        )
        + diag.weights.log()
    )
    torch.testing.assert_close(component_log_prob(x, diag), ref)


@pytest.mark.parametrize("diagonal", [True, False], ids=["diag", "full"])
def test_score_is_the_gradient_of_the_log_density(diagonal):
    x, _ = _two_clusters(8)
    gmm, _ = fit_gmm(x, 2, torch.Generator().manual_seed(2), diagonal=diagonal, reg=0.5)
    points = (torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3).requires_grad_()
    torch.logsumexp(component_log_prob(points, gmm), 1).sum().backward()
    torch.testing.assert_close(gmm_score(points.detach(), gmm), points.grad)


def test_sampling_is_seeded_and_draws_from_the_components():
    x, _ = _two_clusters()
    gmm, _ = fit_gmm(x, 2, torch.Generator().manual_seed(0), reg=0.01)
    a = sample_gmm(gmm, 200, torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_gmm(gmm, 200, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, sample_gmm(gmm, 200, torch.Generator().manual_seed(6)))
    nearest = torch.cdist(a, gmm.means).min(1).values  # every draw sits near one of the two means
    assert nearest.max() < 4.0
    share = (torch.cdist(a, gmm.means).argmin(1) == 0).double().mean()
    assert 0.35 < share < 0.65  # weights 0.5 / 0.5


def test_svgd_moves_particles_to_high_density_and_keeps_them_apart():
    gmm = Mixture(torch.tensor([0.5, 0.5], dtype=torch.float64), CENTRES, torch.ones(2, 4, dtype=torch.float64) * 0.25)
    start = torch.zeros(6, 4, dtype=torch.float64) + 0.01 * torch.randn(
        6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    moved = svgd(start, gmm, steps=300, step_size=0.1)

    def density(x):
        return torch.logsumexp(component_log_prob(x, gmm), 1).mean()

    assert density(moved) > density(start) + 10
    assert torch.equal(moved, svgd(start, gmm, steps=300, step_size=0.1)), "deterministic"
    assert torch.pdist(moved).min() > 0.1, "the kernel's repulsion keeps particles from collapsing onto one point"
    assert torch.equal(svgd(start, gmm, steps=0, step_size=0.1), start)


def _model(backbone, seed=0, **method_kw):
    cfg = make_config(
        backbone.spec.name,
        "bayesprompt",
        template="Review: {text}{soft} Sentiment:{answer}",
        verbalizer={"0": [" negative"], "1": [" positive"]},
        num_virtual_tokens=4,
        **method_kw,
    )
    model = build_model(cfg, backbone, ["0", "1"])
    model.method.initialize(init_context(model, seed, " ", load_examples(SST_TRAIN)))
    return model


@pytest.mark.parametrize("features", ["final", "embedding"])
def test_prompt_tokens_are_the_documented_function_of_the_samples(tiny_llama, features):
    model = _model(tiny_llama, seed=7, rank=2, features=features)
    method = model.method
    examples = load_examples(SST_TRAIN)
    feats = model.represent(examples, features).double()  # (8, D)
    mu, sd = feats.mean(0), feats.std(0, unbiased=False)
    z = (feats - mu) / sd
    # The same steps, on the same seeded generator, as documented: EM (K = 2 classes), 4 draws, SVGD, the map back.
    gen = torch.Generator().manual_seed(7)
    gmm, _ = fit_gmm(z, 2, gen, diagonal=True, reg=0.1, iters=100)
    samples = svgd(sample_gmm(gmm, 4, gen), gmm, 100, 0.5 * 0.1)
    if features == "final":  # hidden states are mapped with the vocabulary embeddings' per-dimension statistics
        ids = vocab_ids(tiny_llama.spec, InitContext(tiny_llama.tokenizer, gen, " "), 4096)
        with torch.no_grad():
            vocab = tiny_llama.embed(ids).double()  # (S, D)
        mu, sd = vocab.mean(0), vocab.std(0)
    torch.testing.assert_close(method.samples, samples.float())
    torch.testing.assert_close(method.anchors, (mu + sd * samples).float())
    with torch.no_grad():
        assert torch.equal(method.vectors(), method.anchors), "zero offset and zero up-projection at the start"
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(8)))
        expected = method.anchors + method.delta + (method.samples @ method.proj_down) @ method.proj_up
        torch.testing.assert_close(method.vectors(), expected)
    assert set(method.state_dict()) == {"samples", "anchors", "delta", "proj_down", "proj_up"}  # all saved
    plain = _model(tiny_llama, seed=7, features=features).method  # rank 0 (default): the same tokens, trained as is
    assert torch.equal(plain.samples, method.samples) and set(plain.state_dict()) == {"samples", "anchors", "delta"}
    with torch.no_grad():
        plain.delta.normal_(generator=torch.Generator().manual_seed(9))
        assert torch.equal(plain.vectors(), plain.anchors + plain.delta)
    assert plain.num_trainable() == 4 * tiny_llama.spec.hidden_size


def test_samples_follow_the_run_seed(tiny_llama):
    a, b, c = (_model(tiny_llama, seed=s).method for s in (3, 3, 4))
    assert torch.equal(a.samples, b.samples) and torch.equal(a.anchors, b.anchors)
    assert not torch.allclose(a.samples, c.samples)


def test_final_hidden_features_land_on_the_embedding_scale(tiny_llama):
    method = _model(tiny_llama, covariance="full", num_components=3, svgd_steps=10).method  # features="final"
    with torch.no_grad():
        vocab = tiny_llama.embed(torch.arange(tiny_llama.spec.vocab_size))  # (V, D)
    assert torch.isfinite(method.anchors).all()
    ratio = method.anchors.std() / vocab.std()
    assert 0.2 < ratio < 5, "anchors are standardised samples mapped with the vocabulary's per-dimension statistics"


def test_initialisation_needs_training_examples(tiny_llama):
    method = BayesPrompt(BayesPromptConfig(num_virtual_tokens=2), tiny_llama.spec)
    with pytest.raises(PromptTuneError, match="training examples"):
        method.initialize(InitContext(tiny_llama.tokenizer, torch.Generator(), " "))
    with pytest.raises(PromptTuneError, match="num_components"):
        _model(tiny_llama, num_components=9)  # more components than the 8 examples


def test_represent_is_the_mean_embedding_of_the_non_special_tokens(tiny_llama):
    model = _model(tiny_llama)
    examples = load_examples(SST_TRAIN)
    tok = tiny_llama.tokenizer
    special = set(tok.all_special_ids)
    expected = []
    for ex in examples:
        ids = model.template.encode(ex, tok, 0, 512).ids
        kept = torch.tensor([i for i in ids if i not in special])
        with torch.no_grad():
            expected.append(tiny_llama.embed(kept).mean(0))
    torch.testing.assert_close(model.represent(examples, "embedding"), torch.stack(expected))
    final = model.represent(examples, "final", batch_size=3)  # left-padded batches of mixed lengths
    alone = torch.cat([model.represent([ex], "final") for ex in examples])
    torch.testing.assert_close(final, alone, rtol=0, atol=1e-5)
    with pytest.raises(PromptTuneError, match="layer"):
        model.represent(examples, "middle")
