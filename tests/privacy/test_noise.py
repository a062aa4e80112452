import torch

from fedpersona.privacy.noise import NoiseSource


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


def test_secure_draws_come_from_the_aes_ctr_stream_not_from_torch(monkeypatch):
    """A secure step never builds a torch generator: its batch and noise come from the AES-256-CTR stream."""
    from fedpersona.privacy import dpstep
    from fedpersona.privacy.noise import CsprngStream

    class NoTorchGenerator:
        def __init__(self, *a, **k):
            raise AssertionError("a secure source built a torch generator")

    monkeypatch.setattr(torch, "Generator", NoTorchGenerator)
    src = NoiseSource()
    gen = dpstep.step_generator(src)
    assert isinstance(gen, CsprngStream)
    idx = dpstep.poisson_batch(src, gen, 1000, 0.2)
    noise = dpstep.flat_noise(src, gen, 5000, std=3.0)
    uniform = dpstep.uniform_batch(gen, 50, 8)
    assert 120 < len(idx) < 280 and noise.dtype == torch.float32 and len(uniform) == 8
    assert 2.7 < float(noise.std()) < 3.3


def test_csprng_gaussians_are_standard_normal_and_keyed_per_step():
    import numpy as np
    from scipy import stats

    from fedpersona.privacy.noise import CsprngStream

    z = CsprngStream().normal(200_001)  # an odd count: the last Box-Muller pair is cut
    assert z.shape == (200_001,) and np.isfinite(z).all()
    # Unseeded (the CSPRNG): a threshold that fails by chance once in a million runs; a broken transform (a cut
    # pair, a wrong scale) gives a p-value far below it on 200,001 draws.
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    # Each step's stream has its own key: two fresh streams never agree; a seeded one is the stream's transform.
    assert not np.array_equal(CsprngStream().normal(64), CsprngStream().normal(64))
    a, b = CsprngStream(seed=b"t").normal(6), CsprngStream(seed=b"t")
    u = b.uniform(6)
    r = np.sqrt(-2 * np.log1p(-u[:3]))
    assert np.allclose(a, np.concatenate([r * np.cos(2 * np.pi * u[3:]), r * np.sin(2 * np.pi * u[3:])]))


def test_robust_noise_is_the_sum_of_four_draws_over_two():
    import numpy as np

    from fedpersona.privacy import dpstep
    from fedpersona.privacy.noise import CsprngStream

    got = dpstep.flat_noise(SECURE_SOURCE, CsprngStream(seed=b"k"), 5, std=2.0)
    draws = CsprngStream(seed=b"k").normal(20).reshape(4, 5)
    assert torch.allclose(got, torch.from_numpy(draws.sum(axis=0) * 2.0 / 2).float())
    assert float(dpstep.flat_noise(SECURE_SOURCE, CsprngStream(), 100_000, std=2.0).std()) == \
        __import__("pytest").approx(2.0, rel=0.02)


SECURE_SOURCE = NoiseSource()
