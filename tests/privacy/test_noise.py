import torch

from privacy.noise import NoiseSource


def test_default_noise_is_not_reproducible_by_seeding_torch():
    src = NoiseSource()
    assert src.secure
    torch.manual_seed(1234)
    a = src.normal((256,), std=1.0)
    torch.manual_seed(1234)
    b = src.normal((256,), std=1.0)
    torch.manual_seed(1234)
    plain = torch.normal(0.0, 1.0, size=(256,))
    assert not torch.equal(a, b)
    assert not torch.equal(a, plain)
    assert 0.8 < float(a.std()) < 1.2


def test_injected_generator_is_reproducible_and_flagged():
    a = NoiseSource(generator=torch.Generator().manual_seed(0))
    b = NoiseSource(generator=torch.Generator().manual_seed(0))
    assert not a.secure
    assert torch.equal(a.normal((8,), std=2.0), b.normal((8,), std=2.0))
    assert torch.equal(a.poisson_mask(100, 0.3), b.poisson_mask(100, 0.3))


def test_poisson_mask_rate_and_bounds():
    m = NoiseSource().poisson_mask(20000, 0.25)
    assert abs(float(m.float().mean()) - 0.25) < 0.02
    assert not NoiseSource().poisson_mask(10, 0.0).any()
    import pytest

    with pytest.raises(ValueError, match="sample rate"):
        NoiseSource().poisson_mask(10, 1.5)


def test_zero_std_gives_zeros():
    assert torch.count_nonzero(NoiseSource().normal((4, 4), std=0.0)) == 0
