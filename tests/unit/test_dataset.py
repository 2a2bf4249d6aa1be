"""Offline datasets: ExORL-style episode files read into replay shards, bad files reported by name
while the good ones load, pickled objects refused, manifests verified, a run's replay exported and
loaded back bit for bit, pixels rendered from stored physics states, and an offline-only run."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from choreo import vocabulary as B
from choreo.buffer.dataset import (MANIFEST, DatasetError, EpisodeError, EpisodeSpec, episode_files,
                                   NpzFolder, export_episodes, load_into, read_episode, read_manifest,
                                   split_episodes)
from choreo.buffer.shard import ReplayShard
from choreo.launch import cli
from choreo.launch.runtime.build import dataset_renderer, env_shapes, load_dataset, make_shard
from choreo.launch.runtime.config import ConfigError, load_config
from choreo.launch.runtime.rundir import RunDir

OBS, ACT = 24, 6  # walker from states
SPEC = EpisodeSpec((OBS,), ACT, "walker_stand")


def exorl_episode(steps: int, seed: int, obs_dim: int = OBS, act_dim: int = ACT) -> dict[str, np.ndarray]:
    """An episode as ExORL writes it: row 0 is the reset (action 0, reward 0, discount 1),
    rewards and discounts as [T, 1]."""
    rng = np.random.default_rng(seed)
    action = rng.uniform(-1, 1, (steps, act_dim)).astype(np.float32)
    action[0] = 0
    reward = rng.uniform(0, 1, (steps, 1)).astype(np.float32)
    reward[0] = 0
    return {"observation": rng.normal(size=(steps, obs_dim)).astype(np.float32), "action": action,
            "reward": reward, "discount": np.ones((steps, 1), np.float32)}


def write(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def held(shard: ReplayShard) -> list[dict[str, np.ndarray]]:
    return list(shard.episodes())


def digest(episode: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(episode):
        h.update(key.encode() + episode[key].dtype.str.encode() + str(episode[key].shape).encode())
        h.update(np.ascontiguousarray(episode[key]).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- reading


def test_an_exorl_episode_reads_in_the_batch_layout(tmp_path):
    ep = exorl_episode(30, 0)
    chunk = read_episode(write(tmp_path / "0_30.npz", **ep), SPEC)
    assert list(chunk) == list(B.KEYS)
    assert chunk[B.OBSERVATION].dtype == np.float32 and chunk[B.OBSERVATION].shape == (30, OBS)
    np.testing.assert_array_equal(chunk[B.REWARD], ep["reward"][:, 0])
    assert chunk[B.REWARD].shape == (30,) and chunk[B.DISCOUNT].dtype == np.float32
    assert chunk[B.IS_FIRST].tolist() == [True] + [False] * 29
    assert chunk[B.IS_LAST].tolist() == [False] * 29 + [True]
    assert not chunk[B.IS_TERMINAL].any()
    assert (chunk[B.SKILL] == -1).all() and chunk[B.SKILL].dtype == np.int32
    assert (chunk[B.POLICY_VERSION] == -1).all() and chunk[B.POLICY_VERSION].dtype == np.int64


def test_a_zero_discount_is_a_termination_and_float64_states_become_float32(tmp_path):
    ep = exorl_episode(10, 1)
    ep["discount"][-1] = 0
    ep["observation"] = ep["observation"].astype(np.float64)
    chunk = read_episode(write(tmp_path / "e.npz", **ep), SPEC)
    assert chunk[B.IS_TERMINAL].tolist() == [False] * 9 + [True]
    assert chunk[B.OBSERVATION].dtype == np.float32


def test_load_into_adds_every_episode_as_its_own_stream_and_splits_files_over_shards(tmp_path):
    for i in range(5):
        write(tmp_path / "buffer" / f"{i}_20.npz", **exorl_episode(20, i))
    files = episode_files(tmp_path)
    assert [f.name for f in files] == [f"{i}_20.npz" for i in range(5)]
    parts = split_episodes(files, 2)
    assert [[f.name for f in p] for p in parts] == [["0_20.npz", "2_20.npz", "4_20.npz"], ["1_20.npz", "3_20.npz"]]
    shard = ReplayShard(1000, seed=0)
    summary = load_into(shard, NpzFolder(tmp_path), parts[0], SPEC)
    assert (summary.episodes, summary.steps, summary.skipped) == (3, 60, [])
    assert shard.stats()["episodes"] == 3 and shard.num_windows(20) == 3  # no window joins two episodes
    assert "loaded 3 episodes, 60 steps" in summary.line(tmp_path) and "0 files skipped" in summary.line(tmp_path)


def test_bad_files_are_reported_by_name_while_the_good_ones_load(tmp_path):
    good = [write(tmp_path / f"good{i}.npz", **exorl_episode(15, i)) for i in range(2)]
    ep = exorl_episode(15, 9)
    bad = {
        "missing.npz": ({k: v for k, v in ep.items() if k != "reward"}, "lacks key(s) ['reward']"),
        "action_size.npz": ({**ep, "action": np.zeros((15, 4), np.float32)}, "action has size 4, but the task "
                                                                            "walker_stand takes 6"),
        "obs_shape.npz": ({**ep, "observation": np.zeros((15, 17), np.float32)}, "expected a float [15, 24]"),
        "obs_dtype.npz": ({**ep, "observation": np.zeros((15, 24), np.int64)}, "int64"),
        "lengths.npz": ({**ep, "reward": np.zeros((14, 1), np.float32)}, "has shape [14, 1], but 'observation' has 15"),
        "nan.npz": ({**ep, "action": np.full((15, 6), np.nan, np.float32)}, "'action' holds NaN"),
        "no_steps.npz": ({k: v[:0] for k, v in ep.items()}, "has no steps"),
    }
    for name, (arrays, _) in bad.items():
        write(tmp_path / name, **arrays)
    (tmp_path / "empty.npz").write_bytes(b"")
    raw = good[0].read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    shard = ReplayShard(1000, seed=0)
    summary = load_into(shard, NpzFolder(tmp_path), episode_files(tmp_path), SPEC)
    assert (summary.episodes, summary.steps) == (2, 30)
    reasons = dict(summary.skipped)
    assert set(reasons) == {*bad, "empty.npz", "truncated.npz"}
    for name, (_, why) in bad.items():
        assert why in reasons[name], (name, reasons[name])
    assert reasons["empty.npz"] == "empty file"
    assert "truncated or damaged" in reasons["truncated.npz"]
    assert "9 files skipped" in summary.line(tmp_path)


def test_pickled_objects_are_refused_and_never_unpickled(tmp_path):
    ran = tmp_path / "ran"

    class Payload:  # unpickling it would create a file
        def __reduce__(self):
            return (Path.touch, (ran,))

    ep = exorl_episode(10, 0)
    objects = np.empty(1, dtype=object)
    objects[0] = Payload()
    write(tmp_path / "objects.npz", **ep, extra=objects, observation_obj=objects)
    with pytest.raises(EpisodeError, match="pickled Python objects"):
        read_episode(write(tmp_path / "obs_object.npz", **{**ep, "observation": objects}), SPEC)
    (tmp_path / "raw_pickle.npz").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(EpisodeError, match="pickled Python objects"):
        read_episode(tmp_path / "raw_pickle.npz", SPEC)
    # Keys the reader does not use are never read, so an object array there is harmless.
    read_episode(tmp_path / "objects.npz", SPEC)
    assert not ran.exists()


def test_a_folder_without_episodes_is_an_error_that_names_it(tmp_path):
    with pytest.raises(DatasetError, match="holds no episodes"):
        episode_files(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        episode_files(tmp_path / "nowhere")


def test_a_shard_that_fills_keeps_the_first_episodes_and_says_so(tmp_path):
    for i in range(4):
        write(tmp_path / f"{i}_30.npz", **exorl_episode(30, i))
    shard = ReplayShard(70, seed=0, name="shard0")
    summary = load_into(shard, NpzFolder(tmp_path), episode_files(tmp_path), SPEC)
    assert (summary.episodes, summary.steps) == (2, 60)
    assert "the last 2 of its 4 files were not loaded" in summary.warnings[0]


# ----------------------------------------------------------------------------- manifests and export


def worker_replay(capacity: int) -> ReplayShard:
    """A shard filled like environment workers fill it: three streams in chunks of 8, episodes of
    20 steps, FIFO eviction (so some episodes are held only in part) and unfinished episodes."""
    shard = ReplayShard(capacity, seed=0)
    rng = np.random.default_rng(0)
    for t0 in range(0, 64, 8):
        for stream in range(3):
            pos = np.arange(t0, t0 + 8) + 5 * stream
            chunk = {B.OBSERVATION: rng.normal(size=(8, OBS)).astype(np.float32),
                     B.ACTION: rng.uniform(-1, 1, (8, ACT)).astype(np.float32),
                     B.REWARD: rng.normal(size=8).astype(np.float32), B.DISCOUNT: np.ones(8, np.float32),
                     B.IS_FIRST: pos % 20 == 0, B.IS_LAST: pos % 20 == 19, B.IS_TERMINAL: np.zeros(8, bool),
                     B.SKILL: rng.integers(-1, 8, 8).astype(np.int32),
                     B.POLICY_VERSION: rng.integers(-1, 50, 8).astype(np.int64)}
            shard.add(chunk, stream)
    return shard


def test_export_then_load_gives_back_the_same_steps_bit_for_bit(tmp_path):
    source = worker_replay(capacity=150)
    exported = held(source)
    assert any(not e[B.IS_FIRST][0] for e in exported) and any(not e[B.IS_LAST][-1] for e in exported)
    result = export_episodes(iter(exported), tmp_path / "data", source="test")
    assert result == {"episodes": len(exported), "steps": source.stats()["steps"]}
    manifest = read_manifest(tmp_path / "data")
    assert sorted(manifest) == sorted(p.name for p in (tmp_path / "data").glob("*.npz"))
    for shards in (1, 2):
        loaded = [ReplayShard(150, seed=1) for _ in range(shards)]
        parts = split_episodes(episode_files(tmp_path / "data"), shards)
        for shard, part in zip(loaded, parts):
            summary = load_into(shard, NpzFolder(tmp_path / "data"), part, SPEC)
            assert summary.skipped == [] and summary.warnings == []
        back = [e for shard in loaded for e in held(shard)]
        assert sorted(map(digest, back)) == sorted(map(digest, exported))
        assert sum(s.num_windows(5) for s in loaded) == source.num_windows(5)


def test_export_refuses_a_folder_that_already_holds_a_dataset(tmp_path):
    export_episodes(iter(held(worker_replay(100))), tmp_path / "d")
    with pytest.raises(DatasetError, match="already holds a dataset"):
        export_episodes(iter([]), tmp_path / "d")


def test_a_manifest_reports_changed_missing_and_unlisted_files_by_name(tmp_path):
    data = tmp_path / "data"
    export_episodes(iter(held(worker_replay(100))), data)
    files = episode_files(data)
    changed = files[0]
    with np.load(changed) as f:
        arrays = dict(f)
    arrays[B.REWARD] = arrays[B.REWARD] + 1
    np.savez(changed, **arrays)
    files[1].unlink()
    write(data / "extra_10.npz", **exorl_episode(10, 3))

    config = load_config(["tiny"], [f"dataset.dir={data}", "num_shards=1", "replay.capacity=1000"])
    shard = make_shard(config, 0)
    steps = load_dataset(config, [shard], (OBS,), ACT)
    listed = read_manifest(data)
    expected = sum(e["steps"] for name, e in listed.items() if name not in (changed.name, files[1].name)) + 10
    assert steps == expected == shard.stats()["steps"]
    summary = load_into(ReplayShard(1000, 0), NpzFolder(data), episode_files(data), SPEC)
    assert summary.skipped == [(changed.name, f"changed on disk since {MANIFEST} was written (SHA-256 differs)")]
    assert any("extra_10.npz: not listed" in w for w in summary.warnings)
    from choreo.launch.runtime.build import check_dataset

    assert any(files[1].name in w and "missing" in w for w in check_dataset(config)[1])

    (data / MANIFEST).write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json cannot be read"):
        read_manifest(data)


def test_choreo_export_writes_a_runs_replay(tmp_path, capsys):
    config = load_config(["tiny"], ["num_shards=2"])
    run_dir = tmp_path / "run"
    RunDir(run_dir).write_config(config)
    sources = [worker_replay(config.replay.capacity // 2) for _ in range(2)]
    for i, shard in enumerate(sources):
        shard.name = f"shard{i}"
        shard.save(run_dir / "replay")
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert "exported" in capsys.readouterr().out
    back = ReplayShard(10_000, 0)
    load_into(back, NpzFolder(tmp_path / "out"), episode_files(tmp_path / "out"), SPEC)
    assert sorted(map(digest, held(back))) == sorted(digest(e) for s in sources for e in held(s))

    assert cli.main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pixels from physics


def test_pixel_runs_render_frames_from_stored_physics_states(tmp_path):
    from choreo.actors.envs import make_env

    env = make_env("walker_stand", obs="pixels", seed=3)
    frame, _ = env.reset()
    frames, states, actions = [frame], [env.unwrapped.physics.get_state().copy()], [np.zeros(ACT, np.float32)]
    for _ in range(4):
        a = np.random.default_rng(len(frames)).uniform(-1, 1, ACT).astype(np.float32)
        frame, *_ = env.step(a)
        frames.append(frame)
        states.append(env.unwrapped.physics.get_state().copy())
        actions.append(a)
    ep = exorl_episode(5, 0)
    ep["action"] = np.array(actions)
    path = write(tmp_path / "ep.npz", **ep, physics=np.array(states))
    config = load_config(["tiny", "pixels"], [])
    obs_shape, action_dim = env_shapes(config)
    chunk = read_episode(path, EpisodeSpec(obs_shape, action_dim), dataset_renderer(config))
    np.testing.assert_array_equal(chunk[B.OBSERVATION], np.array(frames))

    with pytest.raises(EpisodeError, match=r"no 'physics' key"):
        read_episode(write(tmp_path / "nophys.npz", **ep), EpisodeSpec(obs_shape, action_dim),
                     dataset_renderer(config))
    with pytest.raises(EpisodeError, match="cannot render its physics states"):
        read_episode(write(tmp_path / "wrong.npz", **ep, physics=np.zeros((5, 3))),
                     EpisodeSpec(obs_shape, action_dim), dataset_renderer(config))


# ----------------------------------------------------------------------------- commands


def test_offline_pretraining_without_workers_trains_and_writes_snapshots_by_updates(tmp_path):
    data = tmp_path / "data"
    for i in range(4):
        write(data / f"{i}_40.npz", **exorl_episode(40, i))
    code = cli.main(["pretrain", "--local", "--offline", str(data), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=off", "learner.total_updates=12", "learner.snapshot_updates=[5]"])
    assert code == 0
    run_dir = tmp_path / "off"
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["snapshot_12updates.pt", "snapshot_5updates.pt"]
    assert (run_dir / "replay" / "shard0.msgpack").is_file()  # saved once: it never changes
    from choreo.learner.learner import load_torch_file

    state = load_torch_file(run_dir / "checkpoint.pt")
    assert state["updates"] == 12 and state["counters"]["dataset_steps"] == 160 and state["counters"]["frames"] == 0
    snapshot = load_torch_file(run_dir / "snapshots" / "snapshot_12updates.pt")
    assert snapshot["updates"] == 12
    # Offline, the exploration actor-critic is not trained: its weights are those of a fresh agent.
    from choreo.launch.runtime.build import make_agent
    from choreo.launch.runtime.config import from_yaml_file

    fresh = make_agent(from_yaml_file(run_dir / "config.yaml"), (OBS,), ACT).state_dict()
    for key, value in state["agent"].items():
        if key.startswith("explore_ac.actor."):
            assert (value == fresh[key]).all(), key
    assert not all((state["agent"][k] == fresh[k]).all() for k in fresh if k.startswith("skill_ac.actor."))


def test_an_offline_run_resumes_exactly_from_its_saved_replay_without_reading_the_dataset(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(3):
        write(data / f"{i}_40.npz", **exorl_episode(40, i))
    args = ["--preset", "tiny", "--logdir", str(tmp_path), "run_name=off", "learner.total_updates=6"]
    assert cli.main(["pretrain", "--local", "--offline", str(data), *args]) == 0
    assert "loaded 3 episodes, 120 steps" in capsys.readouterr().out
    assert cli.main(["pretrain", "--local", "--offline", str(data), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=whole", "learner.total_updates=9"]) == 0
    capsys.readouterr()
    for path in data.iterdir():
        path.unlink()  # the dataset is gone: the resumed run needs only its replay checkpoint
    run_dir = tmp_path / "off"
    assert cli.main(["pretrain", "--local", "--resume", str(run_dir), "learner.total_updates=9"]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and "120 steps in replay" in out and "loaded" not in out
    from choreo.learner.learner import load_torch_file

    resumed, whole = load_torch_file(run_dir / "checkpoint.pt"), load_torch_file(tmp_path / "whole" / "checkpoint.pt")
    assert resumed["updates"] == whole["updates"] == resumed["batches"] == 9
    # Stopped after 6 updates and resumed, it trained on the batches the uninterrupted run drew
    # (the sampler goes on from its position), so every weight and optimiser state is the same.
    from choreo.launch.runtime.distributed import state_digest

    assert state_digest(resumed["agent"]) == state_digest(whole["agent"])


def test_dataset_command_line_errors_name_the_problem_before_anything_starts(tmp_path, capsys):
    assert cli.main(["pretrain", "--local", "--collect", "--preset", "tiny", "--logdir", str(tmp_path)]) == 2
    assert "--collect keeps collecting" in capsys.readouterr().err
    assert cli.main(["pretrain", "--local", "--offline", str(tmp_path / "none"), "--preset", "tiny",
                     "--logdir", str(tmp_path / "runs")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="datasets are for pretraining"):
        load_config(["tiny"], ["mode=finetune", "from_scratch=true", f"dataset.dir={tmp_path}"])



def test_a_run_with_media_on_writes_images_videos_and_histograms_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = tmp_path / "data"
    for i in range(3):
        write(data / f"{i}_30.npz", **exorl_episode(30, i))
    assert cli.main(["pretrain", "--local", "--offline", str(data), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=media", "learner.total_updates=10", "monitor.media_every=5",
                     "agent.choreographer.num_codes=4"]) == 0
    events = EventAccumulator(str(tmp_path / "media" / "tensorboard"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    images = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    assert set(images) == {"codebook/plot", "skill_ac/videos"}
    steps = [e.step for e in images["skill_ac/videos"]]  # offline: TensorBoard's x axis is updates
    assert len(steps) == 2 and 5 <= steps[0] < 10 <= steps[1]
    assert images["skill_ac/videos"][0].encoded_image_string.startswith(b"GIF")
    assert images["codebook/plot"][0].encoded_image_string.startswith(b"\x89PNG")
    assert "codebook/usage" in events.Tags()["histograms"]
    assert "codebook/resampled_codes" in events.Tags()["scalars"]


def test_an_offline_run_evaluates_every_so_many_updates(tmp_path):
    import json

    data = tmp_path / "data"
    for i in range(3):
        write(data / f"{i}_40.npz", **exorl_episode(40, i))
    assert cli.main(["pretrain", "--local", "--offline", str(data), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=ev", "learner.total_updates=12", "eval.every_updates=5", "eval.episodes=1",
                     "env.task=point_mass_nav"]) == 2  # a dataset of walker's shapes does not fit the point mass
    points = tmp_path / "points"  # the point mass's shapes: short evaluation episodes
    for i in range(3):
        write(points / f"{i}_40.npz", **exorl_episode(40, i, obs_dim=4, act_dim=2))
    assert cli.main(["pretrain", "--local", "--offline", str(points), "--preset", "tiny", "--logdir", str(tmp_path),
                     "run_name=ev2", "learner.total_updates=12", "eval.every_updates=5", "eval.episodes=1",
                     "env.task=point_mass_nav"]) == 0
    evals = [json.loads(line) for line in (tmp_path / "ev2" / "eval.jsonl").read_text().splitlines()]
    assert [e["updates"] // 5 for e in evals] == [0, 1, 2] and evals[-1]["updates"] >= 12 - 4
    assert all(e["frame"] == 0 and len(e["returns"]) == 1 for e in evals)
