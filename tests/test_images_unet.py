"""The EDM-style U-Net: shapes, zero-initialised output, noise conditioning, attention
placement, gradients, and the second derivatives Flux Matching takes through it."""

from __future__ import annotations

import pytest
import torch

from fluxbench.images.unet import Attention, UNet, small_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (the zero-initialised layers hide the rest of the net)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


@pytest.mark.parametrize(
    "channels_in, resolution, multipliers",
    [(1, 8, (1, 2)), (3, 16, (1, 2, 2)), (2, 8, (1,))],
)
def test_output_has_the_input_shape(channels_in, resolution, multipliers):
    net = UNet(channels_in, channels=8, multipliers=multipliers, num_blocks=1, resolution=resolution,
               attention_resolutions=(resolution // 2,))
    x = torch.randn(3, channels_in, resolution, resolution, generator=torch.Generator().manual_seed(0))
    assert net(x, torch.zeros(3)).shape == x.shape


def test_output_is_zero_at_initialisation():
    """The last conv starts at zero, so the preconditioned denoiser starts as D = c_skip x."""
    net = small_unet(1)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(net(x, torch.randn(4, generator=torch.Generator().manual_seed(2))), torch.zeros_like(x))


def test_the_noise_label_changes_the_output():
    net = _randomise(small_unet(1))
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3)).expand(4, 1, 8, 8)
    out = net(x, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[2], out[3])
    assert (out[0] - out[2]).abs().max() > 1e-3


def test_attention_sits_at_the_requested_resolutions():
    """R = 8, levels (1, 2): the 4x4 level has one down block and two up blocks."""
    def count(res):
        net = UNet(1, channels=8, multipliers=(1, 2), num_blocks=1, resolution=8, attention_resolutions=res)
        return sum(isinstance(m, Attention) for m in net.modules())

    assert count((4,)) == 3
    assert count((8,)) == 3
    assert count((4, 8)) == 6
    assert count(()) == 0


def test_every_parameter_receives_a_gradient_after_two_steps():
    """Zero-initialised layers pass no gradient back at first; after two Adam steps all do."""
    torch.manual_seed(0)
    net = small_unet(1)
    gen = torch.Generator().manual_seed(4)
    x, target = torch.randn(8, 1, 8, 8, generator=gen), torch.randn(8, 1, 8, 8, generator=gen)
    c = torch.randn(8, generator=gen)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (net(x, c) - target).square().mean().backward()
        dead = [name for name, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        opt.step()
    assert dead == []


def test_second_derivatives_match_finite_differences():
    """Flux Matching differentiates grad_x [eps^T J_F(x) eps] (a double backward through the
    net, attention included). Compared along a direction v with a central difference of the
    first-order quantity in float64 at h = 1e-3: truncation O(h^2) (1e-6 relative here);
    smaller h loses more to cancellation in the first-order quantity than it gains."""
    net = _randomise(small_unet(1)).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randint(0, 2, x.shape, generator=gen).double() * 2 - 1
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    c = torch.tensor([0.1, -0.3], dtype=torch.float64)

    def quad(z, create_graph):
        z = z.detach().requires_grad_(True) if not z.requires_grad else z
        (vjp,) = torch.autograd.grad(net(z, c), z, eps, create_graph=create_graph)
        return (vjp * eps).sum(), z

    q, z = quad(x.clone().requires_grad_(True), True)
    (g,) = torch.autograd.grad(q, z)
    h = 1e-3
    numeric = (quad(x + h * v, False)[0] - quad(x - h * v, False)[0]) / (2 * h)
    assert float((g * v).sum()) == pytest.approx(float(numeric), rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": 6, "multipliers": (1, 2, 2)}, "cannot be halved"),
        ({"multipliers": ()}, "at least one level"),
        ({"dropout": 1.0}, "dropout"),
        ({"channels": 0}, "channels"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(1, **kwargs)


def test_bad_inputs_are_rejected():
    net = small_unet(1)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="c_noise"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(3))
