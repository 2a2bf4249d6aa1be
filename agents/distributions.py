"""The three distributions the agents use, as small explicit classes.

- `TruncatedNormal`: the actors' action distribution (DrQ-v2 style, as in the reference).
- `OneHotStraightThrough`: the RSSM's categorical latents, sampled as one-hot vectors with a
  straight-through gradient.
- `CodeCategorical`: a categorical over skill codes for a meta-controller.

Sampling takes an optional `torch.Generator` (on the tensors' device) so that callers can seed it;
without one, torch's default generator is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class TruncatedNormal:
    """Normal(mean, std) whose samples are clamped to [-clip, clip] with a straight-through gradient.

    As in DrQ-v2's `TruncatedNormal` (the reference's actor distribution):
    - `sample` is reparameterised: mean + std * eps, then clamped; the clamp passes gradients
      through unchanged (values are exactly the clamped ones);
    - `log_prob` and `entropy` are those of the *un-truncated* Normal, summed over the last
      (action) dimension;
    - `mode` is the mean.
    Shapes: mean, std `[..., A]`; sample `[..., A]`; log_prob, entropy `[...]`.
    """

    def __init__(self, mean: Tensor, std: Tensor, clip: float = 1.0 - 1e-6) -> None:
        self.mean = mean
        self.std = std
        self.clip = clip

    @classmethod
    def from_output(cls, out: Tensor, min_std: float) -> TruncatedNormal:
        """From an actor's raw output `[..., 2A]`: mean = tanh(first half),
        std = 2 * sigmoid(second half / 2) + min_std."""
        mean, std = out.float().chunk(2, -1)  # float32 even under autocast
        return cls(torch.tanh(mean), 2.0 * torch.sigmoid(0.5 * std) + min_std)

    @property
    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        x = self.mean + self.std * eps
        clamped = x.detach().clamp(-self.clip, self.clip)
        return clamped + (x - x.detach())  # value: clamped exactly; gradient: that of x

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.std
        return (-0.5 * z.square() - self.std.log() - _HALF_LOG_2PI).sum(-1)

    def entropy(self) -> Tensor:
        return (0.5 + _HALF_LOG_2PI + self.std.log()).sum(-1)


def _sample_index(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Index of a sample from each categorical over the last dim, by inverting the CDF with one
    uniform number per categorical (zero-probability classes are never chosen). `[..., K] -> [...]`."""
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    return (cdf <= u * cdf[..., -1:]).sum(-1).clamp_max_(probs.shape[-1] - 1)


class _OneHotStraightThrough(torch.autograd.Function):
    """Forward: the one-hot vectors of `index`; backward: the gradient passes to `probs` unchanged.
    Equal to one_hot + probs - sg(probs), without the two extra elementwise passes."""

    @staticmethod
    def forward(ctx, probs: Tensor, index: Tensor) -> Tensor:
        return torch.zeros_like(probs).scatter_(-1, index.unsqueeze(-1), 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class OneHotStraightThrough:
    """Independent categoricals over the last dim, sampled as one-hot vectors whose gradient is
    that of the probabilities (straight-through: sample + probs - sg(probs)).

    Shapes: logits `[..., S, K]` (S variables of K classes); sample, mode, probs `[..., S, K]`;
    entropy `[...]` (summed over the S variables).
    """

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits.float()  # float32 even under autocast: sampling and KLs need it
        self.probs = torch.softmax(self.logits, -1)

    @property
    def mode(self) -> Tensor:
        return _OneHotStraightThrough.apply(self.probs, self.logits.argmax(-1))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            index = _sample_index(self.probs, generator)
        return _OneHotStraightThrough.apply(self.probs, index)

    def entropy(self) -> Tensor:
        log_probs = torch.log_softmax(self.logits, -1).clamp_min(torch.finfo(self.probs.dtype).min)  # 0 * -inf
        return -(self.probs * log_probs).sum((-2, -1))


class CodeCategorical:
    """A categorical over K codes (a meta-controller's choice of skill).

    Samples and the mode are one-hot float vectors `[..., K]` (no straight-through term: the
    reference's is never used); `sample_index` gives indices `[...]`. `log_prob` accepts either an
    integer index `[...]` or a one-hot vector `[..., K]`. `entropy` is `[...]`.
    """

    def __init__(self, logits: Tensor) -> None:
        self.logits = torch.log_softmax(logits.float(), -1)  # normalised, float32 even under autocast

    @property
    def probs(self) -> Tensor:
        return self.logits.exp()

    @property
    def mode(self) -> Tensor:
        return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).to(self.logits.dtype)

    def sample_index(self, generator: torch.Generator | None = None) -> Tensor:
        with torch.no_grad():
            return _sample_index(self.probs, generator)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return F.one_hot(self.sample_index(generator), self.logits.shape[-1]).to(self.logits.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        if x.is_floating_point():  # one-hot [..., K]
            return (x * self.logits).sum(-1)
        return self.logits.gather(-1, x.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        return -(self.probs * self.logits.clamp_min(torch.finfo(self.logits.dtype).min)).sum(-1)  # 0 * -inf
