"""HQG-Net losses: Haar DWT against pywavelets, Gram properties, GAN and combined objectives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt
import torch

from models.losses.gan import discriminator_loss, generator_adversarial_loss
from models.losses.gram import feature_consistency_loss, gram_matrix
from models.losses.haar import haar_dwt, haar_loss, high_frequency
from models.segmenter import segmentation_loss
from models.train.pretrain_g import ssim


@pytest.mark.parametrize("shape", [(8, 8), (9, 12), (15, 7)])
def test_haar_dwt_matches_pywavelets(shape):
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, *shape))
    ours = [s.numpy() for s in haar_dwt(torch.from_numpy(x))]
    for n in range(2):
        for c in range(3):
            ca, (ch, cv, cd) = pywt.dwt2(x[n, c], "haar")  # default mode "symmetric"
            for got, want in zip(ours, (ca, ch, cv, cd)):
                np.testing.assert_allclose(got[n, c], want, atol=1e-12)


def test_haar_loss_is_mean_l1_of_pywavelets_detail_subbands():
    rng = np.random.default_rng(1)
    a, b = rng.random((1, 1, 16, 16)), rng.random((1, 1, 16, 16))
    _, da = pywt.dwt2(a[0, 0], "haar")
    _, db = pywt.dwt2(b[0, 0], "haar")
    expected = np.mean([np.abs(p - q).mean() for p, q in zip(da, db)])
    got = haar_loss(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_haar_loss_zero_for_identical_and_blind_to_brightness():
    x = torch.rand(2, 1, 32, 32)
    assert haar_loss(x, x).item() == 0.0
    # A constant offset lives only in LL: the structure loss does not see it.
    assert haar_loss(x + 0.3, x).item() == pytest.approx(0.0, abs=1e-6)
    assert haar_loss(torch.rand(2, 1, 32, 32), x).item() > 0.05
    assert high_frequency(x).shape == (2, 1, 3, 16, 16)


def test_haar_loss_gradient_and_shape_check():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    haar_loss(x, torch.rand(1, 3, 16, 16)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes differ"):
        haar_loss(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 10))


def test_gram_matrix_symmetric_psd_and_permutation_invariant():
    torch.manual_seed(0)
    f = torch.randn(3, 5, 6, 7)
    g = gram_matrix(f)
    assert g.shape == (3, 5, 5)
    torch.testing.assert_close(g, g.transpose(1, 2))
    assert torch.linalg.eigvalsh(g.double()).min() > -1e-6
    perm = torch.randperm(42)
    shuffled = f.reshape(3, 5, 42)[:, :, perm].reshape(3, 5, 6, 7)
    torch.testing.assert_close(gram_matrix(shuffled), g)


def test_gram_of_vector_is_normalised_outer_product():
    v = torch.randn(4, 80)
    torch.testing.assert_close(gram_matrix(v), torch.einsum("ni,nj->nij", v, v) / 80)


def test_feature_consistency_loss():
    v = torch.randn(4, 80)
    assert feature_consistency_loss(v, v).item() == 0.0
    assert feature_consistency_loss(-v, v).item() == pytest.approx(0.0, abs=1e-6)  # Gram ignores sign
    w = torch.randn(4, 80)
    expected = torch.stack([torch.linalg.norm(torch.outer(a, a) / 80 - torch.outer(b, b) / 80) for a, b in zip(w, v)]).mean()
    assert feature_consistency_loss(w, v).item() == pytest.approx(expected.item(), rel=1e-5)


def test_gan_losses_follow_eq10():
    real, fake = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -1.0)
    sig = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    want_d = -0.5 * (math.log(sig(2.0)) + math.log(1 - sig(-1.0)))
    assert discriminator_loss(real, fake).item() == pytest.approx(want_d, rel=1e-6)
    assert generator_adversarial_loss(fake).item() == pytest.approx(-math.log(sig(-1.0)), rel=1e-6)
    # A discriminator that is right costs less than one that is wrong.
    assert discriminator_loss(real, fake) < discriminator_loss(fake, real)


def test_enhancement_loss_combines_terms_with_paper_weights():
    from models.hqgnet import LossWeights, build_hqgnet, hqgnet_lite

    torch.manual_seed(0)
    net = build_hqgnet(hqgnet_lite(1)).eval()
    y = torch.rand(2, 1, 64, 64)
    x_hat, v_c = net.gen(y, net.g(torch.rand(1, 1, 64, 64)))
    w = LossWeights()
    assert (w.lambda1, w.lambda2, w.lambda3) == (10.0, 1.0, 5.0)
    from models.hqgnet import enhancement_loss

    losses = enhancement_loss(net, y, x_hat, v_c, torch.zeros(2, 1, 6, 6), w)
    assert losses["ca"].item() == pytest.approx(losses["haar"].item() + 10 * losses["fc"].item(), rel=1e-5)
    assert losses["e"].item() == pytest.approx(losses["ca"].item() + losses["gan"].item(), rel=1e-5)
    assert losses["gan"].item() == pytest.approx(math.log(2), rel=1e-5)


def test_segmentation_loss_and_ssim():
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float()
    good, bad = (mask * 2 - 1) * 8, (1 - 2 * mask) * 8
    assert segmentation_loss(good, mask) < 0.05 < segmentation_loss(bad, mask)
    x = torch.rand(2, 1, 32, 32)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(x, torch.rand(2, 1, 32, 32)).item() < 0.2
