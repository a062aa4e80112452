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


def test_a_pickled_secure_source_stays_secure_and_ships_no_state():
    import pickle

    data = pickle.dumps(NoiseSource())
    src = pickle.loads(data)
    assert src.secure
    assert b"torch" not in data and len(data) < 100, data  # the class reference only: no generator, no state
    a, b = pickle.loads(data), pickle.loads(data)
    assert not torch.equal(a.normal((64,), std=1.0), b.normal((64,), std=1.0))  # fresh os.urandom seeds


def test_a_pickled_injected_source_continues_from_its_state():
    import pickle

    src = NoiseSource(generator=torch.Generator().manual_seed(7))
    src.normal((5,), std=1.0)  # advance it
    copy = pickle.loads(pickle.dumps(src))
    assert not copy.secure and copy.generator() is not src.generator()
    assert torch.equal(copy.normal((16,), std=1.0), src.normal((16,), std=1.0))
