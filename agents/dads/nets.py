"""The plain ReLU networks of DADS: q's trunk, the actor and the critics are all
Linear(hidden) + ReLU blocks followed by a linear output (the reference's `fc_layer_params`).
"""

from __future__ import annotations

from torch import Tensor, nn


class ReluMLP(nn.Module):
    """`layers` blocks of Linear(hidden) + ReLU, then Linear(out_dim). `[..., in_dim] -> [..., out_dim]`.

    `out_scale` multiplies the output layer's initial weights and zeroes its bias (tf-agents'
    `init_means_output_factor` = 0.1 for the actor, so that the initial policy is near its prior).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, layers: int, out_scale: float = 1.0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(dim, hidden), nn.ReLU()]
            dim = hidden
        out = nn.Linear(dim, out_dim)
        if out_scale != 1.0:
            nn.init.zeros_(out.bias)
            out.weight.data.mul_(out_scale)
        blocks.append(out)
        self.net = nn.Sequential(*blocks)
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return self.net(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_dim)
