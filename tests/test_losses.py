"""spin_loss against hand-computed values, and the direction of its gradient."""

import math

import pytest
import torch

from spin_core.losses import spin_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_sigmoid_hinge_and_ipo_by_hand():
    # logits = (-1 - -3) - (-2 - -2.5) = 2 - 0.5 = 1.5 ; beta = 0.5
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.5))
    losses, real, generated = spin_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.75)))
    assert real.item() == pytest.approx(0.5 * (-1.0 + 2.0))
    assert generated.item() == pytest.approx(0.5 * (-3.0 + 2.5))
    assert spin_loss(*args, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.25)
    assert spin_loss(*args, beta=0.5, loss_type="ipo")[0].item() == pytest.approx((1.5 - 1.0) ** 2)
    # Hinge is zero once the margin is wide enough.
    assert spin_loss(*args, beta=1.0, loss_type="hinge")[0].item() == 0.0


def test_losses_are_per_example():
    losses, real, generated = spin_loss(t(-1, -2, -3), t(-2, -2, -2), t(-1, -1, -1), t(-1, -1, -1), beta=0.1)
    assert losses.shape == real.shape == generated.shape == (3,)
    assert losses[0] < losses[1] < losses[2]


def test_gradient_pushes_real_up_and_generated_down():
    for loss_type in ("sigmoid", "hinge", "ipo"):
        real = t(-5.0).requires_grad_()
        generated = t(-5.0).requires_grad_()
        losses, _, _ = spin_loss(real, generated, t(-5.0), t(-5.0), beta=0.1, loss_type=loss_type)
        losses.sum().backward()
        # Gradient descent moves against the gradient: real log-prob up, generated down.
        assert real.grad.item() < 0, loss_type
        assert generated.grad.item() > 0, loss_type


def test_rewards_carry_no_gradient():
    real = t(-1.0).requires_grad_()
    _, rewards, _ = spin_loss(real, t(-2.0), t(-1.5), t(-2.0), beta=0.1)
    assert not rewards.requires_grad


def test_unknown_loss_type_names_the_allowed_ones():
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        spin_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="dpo")
