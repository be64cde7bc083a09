"""Tiny torch models for the prediction tests, importable as ``tests.core._models:<factory>``."""

import torch

# How many times each factory ran: the tests check that a spec loads once per process.
CALLS = {"tiny_net": 0}


def tiny_net() -> torch.nn.Module:
    """Two 3x3x3 convolutions and a sigmoid: receptive field 2 voxels each side."""
    CALLS["tiny_net"] += 1
    generator = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, 1, 3, padding=1),
        torch.nn.Sigmoid(),
    )
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return net


def squeezed_net() -> torch.nn.Module:
    """The tiny net with its channel axis dropped: output (N, Z, Y, X)."""
    return torch.nn.Sequential(tiny_net(), torch.nn.Flatten(0, 1))


class _Cropping(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:-1]


def cropping_net() -> torch.nn.Module:
    """A model whose output is smaller than its input."""
    return _Cropping()


def not_a_model() -> str:
    return "not a module"


NOT_CALLABLE = 3
