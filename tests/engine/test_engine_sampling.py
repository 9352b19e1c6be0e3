"""Next-token sampling: greedy is argmax, a tiny nucleus is argmax, seeds reproduce, and draws follow the
tempered softmax (checked with a chi-square bound at a fixed seed)."""

from __future__ import annotations

import pytest
import torch

from star_serve.engine.sampling import make_generator, sample
from star_serve.engine.types import SamplingParams


def _logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def _chi_square(draws: list[int], probs: torch.Tensor) -> float:
    observed = torch.bincount(torch.tensor(draws), minlength=probs.numel()).double()
    expected = probs.double() * len(draws)
    support = expected > 0
    assert observed[~support].sum() == 0, "a token of probability zero was drawn"
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


def test_temperature_zero_is_argmax_and_needs_no_generator() -> None:
    logits = _logits(16, 50)
    params = [SamplingParams(temperature=0.0)] * 16
    assert sample(logits, params, [None] * 16) == logits.argmax(-1).tolist()


def test_extreme_parameters_fall_back_to_argmax_instead_of_failing() -> None:
    logits = _logits(4, 50)
    params = [SamplingParams(temperature=1e-300), SamplingParams(top_p=1e-300), SamplingParams(temperature=1e-6)] * 1
    generators = [torch.Generator().manual_seed(0) for _ in params]
    assert sample(logits[:3], params, generators) == logits[:3].argmax(-1).tolist()


def test_rows_follow_their_own_params() -> None:
    logits = _logits(4, 50, seed=3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=1e-6)] * 2
    gens = [None, torch.Generator().manual_seed(0)] * 2
    assert sample(logits, params, gens) == logits.argmax(-1).tolist()
    with pytest.raises(ValueError):  # one params per row
        sample(logits, params[:3], gens[:3])


def test_tiny_top_p_always_returns_the_argmax_even_at_temperature_one() -> None:
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(1))  # flat enough that sampling varies
    gen = torch.Generator().manual_seed(0)
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6)
    for _ in range(5):
        assert sample(logits, [nucleus] * 64, [gen] * 64) == logits.argmax(-1).tolist()
    free = sample(logits, [SamplingParams(temperature=1.0)] * 64, [gen] * 64)
    assert free != logits.argmax(-1).tolist()  # without the nucleus, the same logits do not always give argmax


def test_same_seed_same_draws_and_choices_differ() -> None:
    logits = torch.zeros(1, 1000)  # uniform: two different generators agreeing on 40 draws is impossible in practice
    params = SamplingParams(temperature=1.0, seed=7)

    def draws(choice: int) -> list[int]:
        gen = make_generator(params, choice)
        assert gen is not None
        return [sample(logits, [params], [gen])[0] for _ in range(40)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    assert make_generator(SamplingParams(seed=None)) is None
    assert make_generator(SamplingParams(seed=7), 3).initial_seed() == make_generator(params, 3).initial_seed()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_draws_follow_the_tempered_softmax(temperature: float) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0]])
    n = 6000
    gen = torch.Generator().manual_seed(11)
    params = SamplingParams(temperature=temperature)
    draws = sample(logits.expand(n, -1), [params] * n, [gen] * n)
    probs = torch.softmax(logits[0] / temperature, dim=-1)
    # 5 degrees of freedom: P(chi2 > 25) is about 1e-4.
    assert _chi_square(draws, probs) < 25
    # The bound has power: the untempered softmax (or uniform) is rejected when the temperature is not 1.
    wrong = torch.full((6,), 1 / 6) if temperature == 1.0 else torch.softmax(logits[0], dim=-1)
    assert _chi_square(draws, wrong) > 100


def test_top_p_draws_only_from_the_renormalised_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    n = 6000
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=1.0, top_p=0.6)  # 0.4 < 0.6 <= 0.4 + 0.25: the top two tokens
    draws = sample(logits.expand(n, -1), [params] * n, [gen] * n)
    assert set(draws) == {0, 1}
    nucleus = torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65
    assert _chi_square(draws, nucleus) < 15  # 1 degree of freedom
