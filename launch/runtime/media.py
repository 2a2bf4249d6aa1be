"""Pictures and videos of what a Choreographer agent learned (the paper's Figure 5 and Appendix E).

- `skill_videos`: every skill of the codebook played in the real environment by the skill policy
  (behaviour "skill", the code held for the whole video, mean actions), all skills' environments
  stepped together with one policy call per step. Pixel agents: each frame shows the decoded skill
  code on the left, the environment on the right (`[T, 64, 128, 3]`); state agents: the rendered
  environment only (`[T, 64, 64, 3]`).
- `code_grid`: every code decoded into an image (pixel agents).
- `codebook_plot`: code usage and a 2-D projection of the codes with a set of model states.
- `learner_media`: what the learner can draw cheaply from a training batch, for TensorBoard.
- `choreo visualize --snapshot FILE` (launch/commands/visualize.py) writes all of the above from a
  snapshot.

Decisions:
- A code's image: the skill decoder maps code e_k to a deterministic state h_k = dec(e_k) (the state
  the code reward pulls the skill towards); the world model's image decoder needs the whole feature
  (stoch, h). We take the stochastic part as the mode of the prior p(z | h_k) (one-hot argmax of
  each latent's logits), the most likely latent the model itself pairs with h_k, with no sampling,
  so a code always gives the same picture. (The paper: "first reconstructing the corresponding
  model state, and next the image observation"; the reference's notebook gives no answer, it acts
  with the exploration policy, see quirk Q9.)
- The codebook projection lives in the code space, where codes are assigned: the given states h are
  encoded by the skill encoder (z_e), and one PCA (SVD) is fitted on the codes and the z_e together.
  Each state is coloured by its nearest code, each code drawn as a labelled star (hollow when no
  given state chose it). Usage: the share of the given states each code takes (bars), beside the
  share in the codebook's EMA counts (`cluster_size`, the training batches' recent assignment).
- `run_visualize` projects the states of the skill videos themselves: the posterior h the skill
  policy computed at each frame. The policy's RSSM and encoder are the world model's (loaded from
  the same snapshot), so these are the world model's posterior states of those episodes, with no
  second pass and no replay needed (a snapshot has none beside it).
- Videos have `steps + 1` frames: the reset frame, then one per agent step. An episode that ends
  within the video restarts (a new reset, the policy's state reset with it). The environment of
  skill k is reset with a seed derived from (config.seed, "visualize", k), so its episode starts
  the same way in any grouping of skills; the skill policy acts in mode "mode" (the posterior
  latent's mode, the mean action), which draws nothing at random, so a skill's video is the same
  whichever skills it is played with. The loop is `choreo.actors.rollout.rollout`.

Pillow writes the GIFs; it merges identical consecutive frames into one longer frame, so a GIF of
a motionless scene may hold fewer frames than given (its playing time is the same).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from choreo import vocabulary as B
from choreo.launch.runtime.config import Config
from choreo.vocabulary import derive_seed

if TYPE_CHECKING:
    import torch

FRAME_SIZE = 64
"""Height and width of a video frame and of a decoded code image."""
FPS = 20.0
"""Frames per second of the GIFs (walker and quadruped from pixels: 2 x 25 ms per agent step)."""
DEFAULT_STEPS = 200
"""Agent steps per skill video of `choreo visualize`."""
ENVS_AT_ONCE = 16
"""Environments stepped together (one policy call per step); more skills go in groups."""
PLOT_POINTS = 5000
"""States drawn at most in the codebook projection (usage counts use all of them)."""


# ----------------------------------------------------------------------------- writers


def encode_gif(frames: np.ndarray, fps: float = FPS) -> bytes:
    """Frames `[T, H, W, 3]` uint8 as an animated GIF that loops (Pillow, an adaptive palette
    per frame)."""
    from PIL import Image

    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    duration = max(int(round(1000.0 / fps)), 20)  # ms; GIF counts in 10 ms, players slow < 20 ms
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return buffer.getvalue()


def write_gif(path: str | os.PathLike, frames: np.ndarray, fps: float = FPS) -> Path:
    """Writes frames `[T, H, W, 3]` uint8 as an animated GIF; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_gif(frames, fps))
    return path


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Writes an image `[H, W, 3]` uint8 as PNG; returns the path."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"write_png: expected [H, W, 3] uint8, got {image.shape} {image.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    return path


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected frames [T >= 1, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    return frames


# ----------------------------------------------------------------------------- decoded codes


def _check_skills(agent: Any) -> None:
    if not hasattr(agent, "skills") or not hasattr(agent.skills, "codebook"):
        raise ValueError(f"{type(agent).__name__} has no skill codebook: pictures of skills need a Choreographer "
                         "agent (algo=choreographer)")


def is_pixel_agent(agent: Any) -> bool:
    """Whether `agent`'s world model decodes images."""
    return bool(getattr(agent.wm, "pixels", False))


def code_features(agent: Any) -> torch.Tensor:
    """The world-model feature of every code `[K, stoch * classes + deter]`: h_k = skill
    decoder(e_k), with the mode of the prior p(z | h_k) as the stochastic part (module docstring)."""
    import torch
    import torch.nn.functional as F

    from choreo.agents.world_model import State

    _check_skills(agent)
    rssm, skills = agent.wm.rssm, agent.skills
    with torch.no_grad():
        deter = skills.decode_code(torch.arange(skills.num_codes, device=skills.codebook.device))  # [K, deter]
        logits = rssm.prior_logits(deter)  # [K, stoch, classes]
        stoch = F.one_hot(logits.argmax(-1), rssm.classes).to(deter.dtype)
        return rssm.feature(State(deter, stoch, logits))


def code_images(agent: Any) -> np.ndarray:
    """Every code decoded through the skill decoder and the world model's image decoder:
    `[K, 64, 64, 3]` uint8 (pixel agents only)."""
    import torch

    _check_skills(agent)
    if not is_pixel_agent(agent):
        raise ValueError("decoded code images need a pixel agent (env.obs=pixels); a state agent's decoder "
                         "gives state vectors")
    with torch.no_grad():
        images = agent.wm.decoder(code_features(agent)).float()  # [K, 3, 64, 64], scaled to [-0.5, 0.5]
        images = ((images + 0.5) * 255.0).clamp(0, 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def tile(images: np.ndarray, columns: int | None = None, pad: int = 2, background: int = 255) -> np.ndarray:
    """Images `[N, H, W, 3]` uint8 in a grid (row by row, `columns` default ceil(sqrt(N))) with
    `pad` pixels of `background` between and around them -> `[H', W', 3]` uint8."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), background, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = image
    return grid


def code_grid(agent: Any, columns: int | None = None) -> np.ndarray:
    """One image of every decoded code (`code_images`), code 0 top left, row by row: `[H, W, 3]` uint8."""
    return tile(code_images(agent), columns)


# ----------------------------------------------------------------------------- codebook plot


def _colours(k: int) -> np.ndarray:
    """`[k, 4]` RGBA, one colour per code: qualitative up to 20 codes, a rainbow beyond."""
    import matplotlib

    if k <= 10:
        return matplotlib.colormaps["tab10"](np.arange(k))
    if k <= 20:
        return matplotlib.colormaps["tab20"](np.arange(k))
    return matplotlib.colormaps["turbo"](np.linspace(0.0, 1.0, k))


def _assign(agent: Any, states: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic states `[..., deter]` -> (skill embeddings z_e `[N, C]`, nearest codes `[N]`)."""
    import torch

    skills = agent.skills
    device = skills.codebook.device
    states = torch.as_tensor(np.asarray(states) if not isinstance(states, torch.Tensor) else states)
    states = states.detach().to(device, torch.float32).reshape(-1, states.shape[-1])
    with torch.no_grad():
        z_e = skills.encoder(states).float()
        return z_e, skills.nearest(z_e)


def codebook_plot(agent: Any, states: Any, path: str | os.PathLike | None = None) -> np.ndarray:
    """A figure of the codebook beside the deterministic states `states` (`[..., deter]`, numpy or
    torch), as `[H, W, 3]` uint8 (also written as PNG to `path` when given):
    left, each code's share of `states` (bars) and of the codebook's EMA counts (black marks);
    right, a PCA of the code space with the codes (stars) and the states' skill embeddings, each
    coloured by its nearest code (module docstring). Drawn with matplotlib's Agg canvas, no display."""
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_skills(agent)
    skills = agent.skills
    k = skills.num_codes
    z_e, index = _assign(agent, states)
    n = int(index.numel())
    if n == 0:
        raise ValueError("codebook_plot needs at least one state")
    counts = torch.bincount(index, minlength=k).cpu().numpy()
    ema = skills.cluster_size.detach().float().cpu().numpy()
    codes = skills.codebook.detach().float()
    points = torch.cat([codes, z_e]).cpu().numpy().astype(np.float64)  # [K + N, C]
    centred = points - points.mean(0)
    _, sing, vh = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vh[:2].T  # [K + N, <= 2]
    if projected.shape[1] < 2:
        projected = np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))
    variance = sing ** 2 / max(float((sing ** 2).sum()), 1e-12)
    variance = np.pad(variance, (0, 2))[:2]
    code_xy, state_xy = projected[:k], projected[k:]
    index_np = index.cpu().numpy()
    if n > PLOT_POINTS:
        keep = np.random.default_rng(0).choice(n, PLOT_POINTS, replace=False)
        state_xy, index_np = state_xy[keep], index_np[keep]
    colours = _colours(k)

    fig = Figure(figsize=(12, 5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    usage, space = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.2]})
    usage.bar(np.arange(k), counts / n, color=colours, label="share of these states")
    usage.scatter(np.arange(k), ema / max(float(ema.sum()), 1e-12), marker="_", s=120, color="black",
                  label="share in the EMA counts", zorder=3)
    usage.set_xlabel("code")
    usage.set_ylabel("share")
    usage.set_xlim(-0.7, k - 0.3)
    usage.set_title(f"code usage: {int((counts > 0).sum())} of {k} codes in {n:,} states")
    usage.legend(loc="upper right", fontsize=8)

    space.scatter(state_xy[:, 0], state_xy[:, 1], c=colours[index_np], s=6, alpha=0.5, linewidths=0)
    used = counts > 0
    space.scatter(code_xy[used, 0], code_xy[used, 1], c=colours[used], marker="*", s=220,
                  edgecolors="black", linewidths=0.8, zorder=3)
    space.scatter(code_xy[~used, 0], code_xy[~used, 1], facecolors="none", marker="*", s=220,
                  edgecolors=colours[~used], linewidths=1.2, zorder=3)
    for i, (x, y) in enumerate(code_xy):
        space.annotate(str(i), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, zorder=4)
    space.set_xlabel(f"PC 1 ({variance[0]:.0%} of variance)")
    space.set_ylabel(f"PC 2 ({variance[1]:.0%})")
    space.set_title("codes (stars; hollow: unused here) and encoded states, by nearest code", fontsize=10)
    fig.tight_layout()
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        write_png(path, image)
    return image


# ----------------------------------------------------------------------------- learner side


def learner_media(agent: Any, batch: Mapping[str, Any], max_sequences: int = 16) -> dict[str, np.ndarray]:
    """What the learner can draw cheaply from a training batch `[B, T, ...]` (keys from
    choreo.vocabulary), for `Monitor.media`:

    - `codebook/decoded_codes`: `code_grid` (pixel agents only), `[H, W, 3]` uint8;
    - `codebook/plot`: `codebook_plot` of the batch's posterior deterministic states, `[H, W, 3]` uint8;
    - `codebook/usage`: the nearest code of each of those states, `[N]` int64 (histogram values).

    The posterior is computed without gradients on the first `max_sequences` sequences, with a
    generator of its own: the agent's parameters and random state are left as they were. An agent
    without a skill codebook (DADS) gives an empty dict.
    """
    import torch

    if not hasattr(agent, "skills") or not hasattr(agent.skills, "codebook"):
        return {}
    wm = agent.wm
    device = agent.skills.codebook.device

    def take(key: str) -> torch.Tensor:
        value = batch[key][:max_sequences]
        value = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.array(value))
        return value.to(device)

    with torch.no_grad():
        embed = wm.encode(take(B.OBSERVATION))
        generator = torch.Generator(device=device).manual_seed(0)
        post, _ = wm.rssm.observe(embed, take(B.ACTION).float(), take(B.IS_FIRST).bool(), generator=generator)
        deter = post.deter.flatten(0, -2).float()  # [N, deter]
        _, index = _assign(agent, deter)
    media: dict[str, np.ndarray] = {}
    if is_pixel_agent(agent):
        media["codebook/decoded_codes"] = code_grid(agent)
    media["codebook/plot"] = codebook_plot(agent, deter)
    media["codebook/usage"] = index.cpu().numpy().astype(np.int64)
    return media


MEDIA_VIDEO_STEPS = 50
"""Agent steps of the skill videos that a pretraining writes to TensorBoard (all skills at once,
tiled): long enough to tell skills apart, short enough to cost seconds every monitor.media_every
updates."""


class MediaSchedule:
    """When a run writes its pictures: once every `every` updates (0: never), the first after
    `every` updates, and at most once per call however many updates a call trained."""

    def __init__(self, every: int, updates: int) -> None:
        self.every = every
        self.mark = updates // every if every else 0

    def due(self, updates: int) -> bool:
        if not self.every or updates // self.every <= self.mark:
            return False
        self.mark = updates // self.every
        return True


def training_media(config: Config, agent: Any, batch: Mapping[str, Any],
                   video_steps: int = MEDIA_VIDEO_STEPS) -> dict[str, np.ndarray]:
    """The pictures a pretraining writes to TensorBoard: `learner_media` of a batch and
    `skill_ac/videos`, every skill played for `video_steps` steps in the real environment, tiled in
    one video `[T, H, W, 3]` (the decoded code beside each frame for pixel agents). Empty for
    agents without a skill codebook."""
    media = learner_media(agent, batch)
    if not media:
        return media
    videos = np.stack(compose_videos(agent, rollout_skills(config, agent, video_steps)))  # [K, T, h, w, 3]
    media["skill_ac/videos"] = np.stack([tile(videos[:, t]) for t in range(videos.shape[1])])
    return media


# ----------------------------------------------------------------------------- skill rollouts


@dataclass
class SkillRollouts:
    """The skills played in the environment (see `rollout_skills`)."""

    skills: list[int]
    """The code of each video."""
    frames: np.ndarray
    """[K, steps + 1, 64, 64, 3] uint8 environment frames."""
    deter: np.ndarray
    """[K, steps + 1, deter] float32: the posterior deterministic state h after each frame."""


def rollout_skills(config: Config, agent: Any, steps: int, skills: Sequence[int] | None = None,
                   envs_at_once: int = ENVS_AT_ONCE, seed: int | None = None) -> SkillRollouts:
    """Plays each skill (all codes by default) for `steps` agent steps in environments built from
    `config.env`, with the skill policy (behaviour "skill", `initial_state(n, skill=k)`, mode
    "mode") holding `agent`'s acting weights. Up to `envs_at_once` skills' environments step
    together, one policy call per step. `seed` defaults to `config.seed`."""
    from choreo.actors.envs import make_env_from_config
    from choreo.actors.rollout import rollout
    from choreo.agents.registry import make_policy

    _check_skills(agent)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    num_codes = agent.skills.num_codes
    skills = list(range(num_codes)) if skills is None else [int(k) for k in skills]
    if not skills or not all(0 <= k < num_codes for k in skills):
        raise ValueError(f"skills must be codes in 0..{num_codes - 1}, got {skills}")
    root = derive_seed(config.seed if seed is None else seed, "visualize")
    env_config = dataclasses.replace(config.env, image_size=FRAME_SIZE)  # states: only the renders' size
    n = max(1, min(envs_at_once, len(skills)))
    envs = [make_env_from_config(env_config, seed=derive_seed(root, "env", i)) for i in range(n)]
    try:
        obs_shape = tuple(envs[0].observation_space.shape)
        pixels = len(obs_shape) == 3
        policy = make_policy(config.algo, obs_shape, int(np.prod(envs[0].action_space.shape)), config.agent,
                             behaviour="skill", seed=derive_seed(root, "policy"))
        policy.load_weights(agent.policy_weights(), int(getattr(agent, "updates", 0)))
        frames = np.empty((len(skills), steps + 1, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
        deter = np.empty((len(skills), steps + 1, agent.wm.rssm.deter), np.float32)
        for start in range(0, len(skills), n):
            group = skills[start:start + n]
            m = len(group)

            def record(t: int, observation: np.ndarray, state: Any) -> None:
                deter[start:start + m, t] = state.latent.deter.float().numpy()

            played = rollout(policy, envs[:m], steps, state=policy.initial_state(m, skill=np.array(group)), mode="mode",
                             seeds=[derive_seed(root, "skill", k) for k in group],
                             record=("observations",) if pixels else ("frames",), on_act=record)
            frames[start:start + m] = played["observations"].transpose(0, 1, 3, 4, 2) if pixels else played["frames"]
    finally:
        for env in envs:
            env.close()
    return SkillRollouts(skills, frames, deter)


def compose_videos(agent: Any, rollouts: SkillRollouts) -> list[np.ndarray]:
    """One video per skill: pixel agents, the decoded code (left) beside the environment (right),
    `[T, 64, 128, 3]`; state agents, the environment frames `[T, 64, 64, 3]`."""
    if not is_pixel_agent(agent):
        return [frames for frames in rollouts.frames]
    codes = code_images(agent)
    videos = []
    for k, frames in zip(rollouts.skills, rollouts.frames):
        code = np.broadcast_to(codes[k], frames.shape)
        videos.append(np.concatenate([code, frames], axis=2))
    return videos


def skill_videos(config: Config, snapshot_or_agent: Any, steps: int, skills: Sequence[int] | None = None,
                 envs_at_once: int = ENVS_AT_ONCE, seed: int | None = None, device: str = "cpu") -> list[np.ndarray]:
    """A video of each skill (all codes by default), `steps + 1` frames uint8 (see
    `compose_videos` for the layout). snapshot_or_agent: a learner-side agent, or the path of a
    snapshot, loaded into an agent built from `config` (on `device`) after checking that it fits."""
    agent = snapshot_or_agent
    if isinstance(agent, (str, os.PathLike)):
        from choreo.launch.runtime.snapshot import Snapshot

        agent = Snapshot.open(agent, config=config).make_agent(device)
    return compose_videos(agent, rollout_skills(config, agent, steps, skills, envs_at_once, seed))
