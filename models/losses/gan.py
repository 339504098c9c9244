"""The standard GAN loss of HQG-Net (Eq. 10) on PatchGAN logit maps, as BCE-with-logits.

Eq. 10 is min_G max_D E[log D(real)] + E[log(1 - D(x_hat))]. The discriminator minimises the
BCE of real patches against 1 and enhanced patches against 0; the generator uses the usual
non-saturating form (BCE of D(x_hat) against 1), which has the same fixed point and does not
stall when D wins early. "Real" are HQ images: the text says E_dis separates LQ from HQ (the
printed E_y in Eq. 10 would make the enhancer imitate the LQ set, see docs/hqgnet.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["discriminator_loss", "generator_adversarial_loss"]


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """E_dis objective: -(log D(real) + log(1 - D(fake))), mean over patches, halved (pix2pix)."""
    real = F.binary_cross_entropy_with_logits(real_logits.float(), torch.ones_like(real_logits, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(fake_logits.float(), torch.zeros_like(fake_logits, dtype=torch.float32))
    return 0.5 * (real + fake)


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """E_gen's L_GAN term: -log D(x_hat), mean over patches."""
    return F.binary_cross_entropy_with_logits(fake_logits.float(), torch.ones_like(fake_logits, dtype=torch.float32))
