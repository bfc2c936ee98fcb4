"""bench/effect_readability.py scores any reader's predicted writes by the effect fit's own residual energy."""

import torch

from attention_lens.effect_fit import Problem, residual_energy
from bench.effect_readability import linear_writes, recovered


def test_a_linear_reader_recovers_what_the_fit_measures():
    """Writes from linear maps, scored as arbitrary writes, give 1 - residual_energy / energy; the exact maps
    recover the whole effect, zero maps nothing."""
    generator = torch.Generator().manual_seed(0)
    positions, top, d_model, heads, d_head = 600, 5, 12, 3, 4  # more positions than one chunk of 256
    metric = torch.randn(positions, top, d_model, generator=generator)
    inputs = torch.randn(positions, heads, d_head, generator=generator)
    true_maps = torch.randn(heads, d_head, d_model, generator=generator)
    targets = torch.bmm(metric, linear_writes(Problem(metric, inputs, torch.zeros(positions, top, heads),
                                                      torch.zeros(positions)), true_maps).transpose(1, 2))
    problem = Problem(metric, inputs, targets, torch.zeros(positions))
    guess = true_maps + 0.5 * torch.randn(heads, d_head, d_model, generator=generator)
    energy = targets.pow(2).sum((0, 1))
    torch.testing.assert_close(recovered(problem, linear_writes(problem, guess)),
                               1 - residual_energy(problem, guess) / energy)
    torch.testing.assert_close(recovered(problem, linear_writes(problem, true_maps)), torch.ones(heads),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(recovered(problem, torch.zeros(positions, heads, d_model)), torch.zeros(heads))
