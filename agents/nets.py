"""Network building blocks shared by the world model and the actor-critics.

Sizes follow the reference implementation (DreamerV2 in PyTorch, default PyTorch initialisation).
Every module accepts arbitrary leading dimensions: `[..., D]` for vectors, `[..., 3, 64, 64]` for
images. No module stores a device; tensors follow their inputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """`layers` blocks of Linear(units) [+ LayerNorm] + ELU, then Linear(out_dim).

    With `out_dim=None` there is no output layer and the result is the last block's `units`
    features (the reference's state encoder). `[..., in_dim] -> [..., out_dim or units]`.
    """

    def __init__(self, in_dim: int, out_dim: int | None, units: int, layers: int, norm: bool) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers):
            blocks.append(nn.Linear(dim, units))
            if norm:
                blocks.append(nn.LayerNorm(units))
            blocks.append(nn.ELU(inplace=True))  # on a fresh Linear/LayerNorm output: safe, saves memory
            dim = units
        if out_dim is not None:
            blocks.append(nn.Linear(dim, out_dim))
            dim = out_dim
        self.net = nn.Sequential(*blocks)
        self.in_dim = in_dim
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        # Run on a 2-D view: a Linear output is then a fresh tensor (not a view of one), so the
        # in-place ELU does not make autograd copy whole activations in the backward pass.
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_dim)


COMPILED_VARIANTS = 64
"""Compiled graphs kept per forward: every MLP shares one code object, and each instance, input
shape and grad mode is a variant (torch's default of 8 would send the rest back to eager)."""


def compile_forwards(root: nn.Module, kinds: tuple[type, ...], mode: str = "default") -> int:
    """Compiles, in place (`nn.Module.compile`), every module of `root` that is one of `kinds`;
    returns how many. In place, so that state-dict keys, and with them checkpoints and policy
    weights, stay the same with and without compilation."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILED_VARIANTS)
    count = 0
    for module in root.modules():
        if isinstance(module, kinds):
            module.compile(mode=mode)
            count += 1
    return count


class ConvEncoder(nn.Module):
    """4 x [Conv2d(kernel 4, stride 2, no padding) + ELU] with depths d, 2d, 4d, 8d.

    `[..., 3, 64, 64]` float (already scaled) -> `[..., 8d * 2 * 2]` (1536 at d = 48).
    """

    def __init__(self, depth: int = 48, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(4):
            layers += [nn.Conv2d(channels, depth * 2**i, kernel_size=4, stride=2), nn.ELU()]
            channels = depth * 2**i
        self.net = nn.Sequential(*layers)
        self.out_dim = channels * 2 * 2  # for 64 x 64 inputs: 64 -> 31 -> 14 -> 6 -> 2

    def forward(self, image: Tensor) -> Tensor:
        lead = image.shape[:-3]
        # Channels-last images take oneDNN's (and cuDNN's) faster convolutions: about 1.6x on
        # this network's forward and 1.4x on its backward on the development CPUs, same values
        # up to rounding. The layout carries through every layer; the flattening reads [C, H, W].
        x = image.reshape(-1, *image.shape[-3:]).contiguous(memory_format=torch.channels_last)
        x = self.net(x)  # [N, 8d, 2, 2]
        return x.reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """Linear(feat -> 32d), reshape [32d, 1, 1], then ConvTranspose k5, k5, k6, k6 (stride 2) to
    4d, 2d, d, 3 channels with ELU between and identity at the end.

    `[..., feat_dim] -> [..., 3, 64, 64]` (the mean of a unit-variance Gaussian).
    """

    def __init__(self, feat_dim: int, depth: int = 48, out_channels: int = 3) -> None:
        super().__init__()
        self.depth = depth
        self.linear = nn.Linear(feat_dim, 32 * depth)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, kernel_size=5, stride=2), nn.ELU(),  # 5 x 5
            nn.ConvTranspose2d(4 * depth, 2 * depth, kernel_size=5, stride=2), nn.ELU(),  # 13 x 13
            nn.ConvTranspose2d(2 * depth, depth, kernel_size=6, stride=2), nn.ELU(),  # 30 x 30
            nn.ConvTranspose2d(depth, out_channels, kernel_size=6, stride=2),  # 64 x 64
        )

    def forward(self, feat: Tensor) -> Tensor:
        lead = feat.shape[:-1]
        # Channels-last, as in the encoder (about 1.3x forward, 1.15x backward here).
        x = self.linear(feat).reshape(-1, 32 * self.depth, 1, 1).contiguous(memory_format=torch.channels_last)
        x = self.net(x)  # [N, 3, 64, 64], channels-last
        return x.reshape(*lead, *x.shape[1:])


class LayerNormGRUCell(nn.Module):
    """DreamerV2's GRU cell: one Linear(inp + hidden -> 3 hidden) followed by LayerNorm.

    reset = sigmoid(r); cand = tanh(reset * c); update = sigmoid(u - 1);
    h' = update * cand + (1 - update) * h.   `x [..., inp], h [..., hidden] -> [..., hidden]`.
    """

    def __init__(self, inp: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.linear = nn.Linear(inp + hidden, 3 * hidden)
        self.norm = nn.LayerNorm(3 * hidden)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        parts = self.norm(self.linear(torch.cat([x, h], -1)))
        reset, cand, update = parts.chunk(3, -1)
        cand = torch.tanh(torch.sigmoid(reset) * cand)
        update = torch.sigmoid(update - 1.0)
        return h + update * (cand - h)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the modules' parameters do not require gradients (so backward neither
    computes nor accumulates their gradients); the previous flags are restored afterwards.
    Gradients still flow *through* the modules to inputs that require them."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def load_acting_weights(module: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load a learner's acting weights (numpy arrays by state-dict name) into an acting policy
    strictly: every name present, none extra, the same shapes, or a ValueError naming them."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"policy weights do not match: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(np.shape(arrays[name])) != shape:
            raise ValueError(f"policy weight '{name}' has shape {np.shape(arrays[name])}, expected {shape}")
    # A copy: arrays from the object store are read-only views, which torch warns about.
    module.load_state_dict({name: torch.from_numpy(np.array(arrays[name])) for name in expected}, strict=True)
