"""Pictures of what an agent learned: skill videos played in a real dm_control walker (state and
pixel agents), decoded codes, the codebook plot, GIF and PNG files, TensorBoard media, and
`choreo visualize` from a snapshot. Tiny networks, three codes, a few steps."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from choreo import vocabulary as B
from choreo.launch.runtime.build import env_shapes
from choreo.launch.runtime.config import ConfigError, load_config
from choreo.launch.cli import main as cli_main
from choreo.launch.runtime.monitor import Monitor
from choreo.launch.commands.visualize import run_visualize
from choreo.launch.runtime.media import (code_grid, code_images, codebook_plot, encode_gif, learner_media, rollout_skills,
                                         skill_videos, write_gif, write_png)

CODES = 3


def tiny_config(*presets: str, **overrides):
    extra = [f"{k}={v}" for k, v in overrides.items()]
    return load_config(["tiny", *presets], [f"agent.choreographer.num_codes={CODES}", "learner.device=cpu", *extra])


def make_agent(config):
    from choreo.agents.registry import make_agent as registered

    return registered(config.algo, *env_shapes(config), config.agent, seed=1, device="cpu")


@pytest.fixture(scope="module")
def states():
    config = tiny_config()
    return config, make_agent(config)


@pytest.fixture(scope="module")
def pixels():
    config = tiny_config("pixels")
    return config, make_agent(config)


def test_state_agent_videos_are_rendered_frames(states):
    config, agent = states
    videos = skill_videos(config, agent, steps=4)
    assert len(videos) == CODES
    for video in videos:
        assert video.shape == (5, 64, 64, 3) and video.dtype == np.uint8  # the reset frame + one per step
        assert video.std() > 0 and not np.array_equal(video[0], video[-1])  # a rendered, moving walker
    rollouts = rollout_skills(config, agent, steps=2, skills=[2, 0], envs_at_once=1)
    assert rollouts.skills == [2, 0] and rollouts.deter.shape == (2, 3, config.agent.world_model.deter)
    # A skill's episode starts where it would in any grouping; a call repeats exactly.
    again = rollout_skills(config, agent, steps=2, skills=[0, 2], envs_at_once=2)
    np.testing.assert_array_equal(rollouts.frames[0, 0], again.frames[1, 0])
    repeat = rollout_skills(config, agent, steps=2, skills=[0, 2], envs_at_once=2)
    np.testing.assert_array_equal(repeat.frames, again.frames)
    np.testing.assert_array_equal(repeat.deter, again.deter)


def test_pixel_agent_videos_show_the_decoded_code_beside_the_environment(pixels):
    config, agent = pixels
    videos = skill_videos(config, agent, steps=3, skills=[0, 2])
    codes = code_images(agent)
    assert codes.shape == (CODES, 64, 64, 3) and codes.dtype == np.uint8
    for video, k in zip(videos, (0, 2)):
        assert video.shape == (4, 64, 128, 3) and video.dtype == np.uint8
        assert all(np.array_equal(frame[:, :64], codes[k]) for frame in video)
        assert video[:, :, 64:].std() > 0


def test_code_grid_tiles_every_code(pixels, states):
    _, agent = pixels
    grid = code_grid(agent)
    assert grid.dtype == np.uint8 and grid.shape == (2 + 2 * 66, 2 + 2 * 66, 3)  # 3 codes: 2 x 2 tiles, 2 px gaps
    np.testing.assert_array_equal(grid[2:66, 68:132], code_images(agent)[1])
    with pytest.raises(ValueError, match="pixel agent"):
        code_grid(states[1])


def test_codebook_plot_is_an_rgb_image(states, tmp_path):
    config, agent = states
    h = torch.randn(200, config.agent.world_model.deter)
    image = codebook_plot(agent, h, path=tmp_path / "codebook.png")
    assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8 and image.shape[0] > 100
    assert image.std() > 0
    with Image.open(tmp_path / "codebook.png") as png:
        assert png.size == (image.shape[1], image.shape[0]) and png.mode == "RGB"


def test_learner_media_from_a_batch_leaves_the_agent_alone(pixels, states):
    config, agent = pixels
    obs_shape, action_dim = env_shapes(config)
    rng = np.random.default_rng(0)
    batch = {B.OBSERVATION: rng.integers(0, 255, (2, 5, *obs_shape), dtype=np.uint8),
             B.ACTION: rng.uniform(-1, 1, (2, 5, action_dim)).astype(np.float32),
             B.IS_FIRST: np.eye(1, 5, dtype=bool).repeat(2, 0)}
    before = agent.generator.get_state().clone(), {k: v.clone() for k, v in agent.state_dict().items()
                                                   if isinstance(v, torch.Tensor)}
    media = learner_media(agent, batch)
    assert set(media) == {"codebook/decoded_codes", "codebook/plot", "codebook/usage"}
    assert media["codebook/decoded_codes"].shape == code_grid(agent).shape
    assert media["codebook/plot"].dtype == np.uint8 and media["codebook/plot"].shape[-1] == 3
    usage = media["codebook/usage"]
    assert usage.shape == (10,) and usage.min() >= 0 and usage.max() < CODES
    assert torch.equal(agent.generator.get_state(), before[0])
    assert all(torch.equal(v, before[1][k]) for k, v in agent.state_dict().items() if k in before[1])

    config, agent = states
    obs_dim = env_shapes(config)[0][0]
    batch[B.OBSERVATION] = rng.normal(size=(2, 5, obs_dim)).astype(np.float32)
    assert set(learner_media(agent, batch)) == {"codebook/plot", "codebook/usage"}


def moving_square(n: int) -> np.ndarray:
    frames = np.zeros((n, 32, 48, 3), np.uint8)
    for t in range(n):
        frames[t, 8:16, 4 * t:4 * t + 8] = (255, 80, 0)
    return frames


def test_gif_and_png_read_back(tmp_path):
    path = write_gif(tmp_path / "a" / "clip.gif", moving_square(7), fps=10)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 7 and gif.size == (48, 32)
        assert gif.info["duration"] == 100
        gif.seek(3)
        assert np.asarray(gif.convert("RGB"))[12, 14].tolist() == [255, 80, 0]
    image = moving_square(1)[0]
    with Image.open(write_png(tmp_path / "one.png", image)) as png:
        np.testing.assert_array_equal(np.asarray(png), image)
    with pytest.raises(ValueError):
        write_png(tmp_path / "bad.png", image.astype(np.float32))


def test_monitor_writes_images_videos_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitor = Monitor(tmp_path, total_frames=10, stream=io.StringIO())
    monitor.image("pictures/still", moving_square(1)[0], step=3)
    monitor.video("pictures/clip", moving_square(5), step=3, fps=10)
    monitor.histogram("codebook/usage", np.array([0, 1, 1, 2, 2, 2]), step=3)
    monitor.media({"m/image": moving_square(1)[0], "m/video": moving_square(2), "m/values": np.arange(4.0)}, step=4)
    monitor.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"pictures/still", "pictures/clip", "m/image", "m/video"} <= set(tags["images"])
    assert {"codebook/usage", "m/values"} <= set(tags["histograms"])
    (still,) = events.Images("pictures/still")
    assert still.step == 3 and still.encoded_image_string.startswith(b"\x89PNG") and (still.width, still.height) == (48, 32)
    (clip,) = events.Images("pictures/clip")
    assert clip.encoded_image_string.startswith(b"GIF") and (clip.width, clip.height) == (48, 32)
    assert clip.encoded_image_string == encode_gif(moving_square(5), 10)
    with Image.open(io.BytesIO(clip.encoded_image_string)) as gif:
        assert gif.n_frames == 5
    (hist,) = events.Histograms("codebook/usage")
    assert hist.histogram_value.num == 6 and hist.histogram_value.max == 2


def test_media_every_is_a_monitor_key():
    assert load_config(["paper"]).monitor.media_every == 10000
    assert load_config(["tiny"]).monitor.media_every == 0
    with pytest.raises(ConfigError, match="monitor.media_every"):
        load_config(["tiny"], ["monitor.media_every=-1"])


@pytest.mark.parametrize("presets", [(), ("pixels",)], ids=["states", "pixels"])
def test_visualize_command_from_a_snapshot(tmp_path, presets, capsys):
    from choreo.learner.snapshot import save_snapshot

    config = tiny_config(*presets)
    agent = make_agent(config)
    snapshot = save_snapshot(tmp_path / "run" / "snapshot_1000.pt", agent.state_dict(), config, 1000, 10)

    assert cli_main(["visualize", "--snapshot", str(snapshot), "--steps", "2",
                     "agent.choreographer.random_skill_every=5"]) == 0
    out = tmp_path / "run" / "visualize"
    assert capsys.readouterr().out.strip().endswith(f"visualizations in {out}")
    expected = {f"skill_{k:02d}.gif" for k in range(CODES)} | {"codebook.png"}
    expected |= {"codes.png"} if presets else set()
    assert {p.name for p in out.iterdir()} == expected
    with Image.open(out / "skill_01.gif") as gif:
        assert gif.size == ((128 if presets else 64), 64)

    other = run_visualize(snapshot, tmp_path / "elsewhere", steps=1, stream=io.StringIO())
    assert (other / "codebook.png").is_file()
    with pytest.raises(ConfigError, match="unknown config key"):
        run_visualize(snapshot, tmp_path / "x", ["agent.nonsense=1"], steps=1, stream=io.StringIO())
