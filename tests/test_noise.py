"""The C Gaussian kernel (veil/csrc/gaussian.c): a standard normal stream, determined by its seed."""
import numpy as np
import pytest
import torch
from scipy import stats

from veil.optimizers import noise
from veil.utils import native

needs_kernel = pytest.mark.skipif(native.library("gaussian", noise._declare) is None,
                                  reason="no C compiler: the compiled Gaussian kernel is unavailable")


def fill(n, seed, std=1.0):
    buf = torch.empty(n, dtype=torch.float32)
    native.library("gaussian").gaussian_fill(buf.data_ptr(), n, seed, std)
    return buf


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2**62 - 1])
def test_stream_is_standard_normal(seed):
    n = 1_000_000
    z = fill(n, seed).double().numpy()
    assert np.isfinite(z).all() and np.abs(z).max() < 6.8
    assert stats.kstest(z, "norm").pvalue > 1e-4
    se = n ** -0.5
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * 2 ** 0.5 * se  # var of a sample variance: 2/n
    assert abs(stats.skew(z)) < 5 * 6 ** 0.5 * se
    assert abs(stats.kurtosis(z)) < 5 * 24 ** 0.5 * se
    for k in (3.0, 4.0):  # the tails: observed counts of |z| > k against the binomial
        p = 2 * stats.norm.sf(k)
        assert abs((np.abs(z) > k).sum() - n * p) < 5 * (n * p) ** 0.5 + 1, k
    # the chunk layout puts each Box-Muller pair's cos and sin 256 apart, and a Philox block's outputs
    # in four quarters of 1024: no correlation at any of these lags
    for lag in (1, 256, 512, 768, 1024):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 * se, lag


@needs_kernel
def test_pairs_are_independent():
    """Box-Muller's two outputs share r: their squares must still be uncorrelated (independence, not
    just zero correlation), as must the quarter blocks of one Philox output."""
    z = fill(1024 * 1000, 5).double().numpy().reshape(1000, 4, 256)
    for a, b in ((0, 1), (0, 2), (2, 3)):
        x, y = z[:, a].ravel(), z[:, b].ravel()
        assert abs(np.corrcoef(x ** 2, y ** 2)[0, 1]) < 5 / len(x) ** 0.5, (a, b)


@needs_kernel
def test_seed_determines_the_stream():
    a, b, c = fill(5000, 42), fill(5000, 42), fill(5000, 43)
    assert torch.equal(a, b)
    assert abs(np.corrcoef(a.numpy(), c.numpy())[0, 1]) < 0.06
    assert torch.equal(fill(3000, 42)[:2048], a[:2048]), "whole 1024-value chunks do not depend on n"
    assert torch.allclose(fill(7, 9, 3.0), 3.0 * fill(7, 9), rtol=1e-6, atol=0)


@needs_kernel
def test_torch_seed_reproduces_gaussian_and_buffers_of_any_length():
    for n in (1, 3, 1023, 1024, 1025, 4099):
        torch.manual_seed(0)
        a = noise.gaussian_(torch.empty(n), 1.5)
        torch.manual_seed(0)
        b = noise.gaussian_(torch.empty(n), 1.5)
        assert torch.equal(a, b) and torch.isfinite(a).all()
        torch.manual_seed(1)
        assert not torch.equal(noise.gaussian_(torch.empty(n), 1.5), a)


def test_other_dtypes_and_layouts_use_torch_normal():
    buf = torch.empty(10_000, dtype=torch.float64)
    fill_fn, fast = noise._filler(buf)
    assert not fast
    assert not noise._filler(torch.empty(100, 2)[:, 0])[1]  # strided
    z = noise.gaussian_(buf, 2.0, torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 2.0) < 0.1


def test_fallback_without_kernel_is_normal():
    native.set_enabled("gaussian", False)
    try:
        assert not noise._filler(torch.empty(10))[1]
        z = noise.gaussian_(torch.empty(200_000), 1.0, torch.Generator().manual_seed(0)).double().numpy()
    finally:
        native.set_enabled("gaussian", True)
    assert stats.kstest(z, "norm").pvalue > 1e-4


def _philox4x32_10(counter, key):
    """Reference Philox4x32-10 (Salmon et al. 2011), in Python integers."""
    m = 0xFFFFFFFF
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & m, (p0 >> 32) ^ c[3] ^ k1, p0 & m]
        k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
    return c


def test_reference_philox_matches_published_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    m = 0xFFFFFFFF
    assert _philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox4x32_10([m] * 4, [m, m]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@needs_kernel
@pytest.mark.parametrize("seed", [0x0123456789ABCDEF, 7, 99])
def test_kernel_equals_philox_box_muller_reference(seed):
    """The first chunk (1024 values) against Philox and Box-Muller in float64: block j's words (w0, w1)
    and (w2, w3) give pairs whose cos and sin outputs sit at j, 256 + j, 512 + j and 768 + j. The kernel's
    own ln, sin and cos (float32) are within a few float32 ulps: 3e-7 at most over these seeds."""
    key = [seed & 0xFFFFFFFF, seed >> 32]
    words = np.array([_philox4x32_10([j, 0, 0, 0], key) for j in range(256)], dtype=np.uint64)
    u1 = (words[:, [0, 2]].astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -32)
    u2 = (words[:, [1, 3]] >> 8).astype(np.float64) * 2.0 ** -24
    r = np.sqrt(-2 * np.log(u1.astype(np.float64)))
    want = np.concatenate([r[:, 0] * np.cos(2 * np.pi * u2[:, 0]), r[:, 0] * np.sin(2 * np.pi * u2[:, 0]),
                           r[:, 1] * np.cos(2 * np.pi * u2[:, 1]), r[:, 1] * np.sin(2 * np.pi * u2[:, 1])])
    got = fill(1024, seed).double().numpy()
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=4e-7)
