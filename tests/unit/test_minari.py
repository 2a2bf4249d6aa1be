"""Minari datasets, both ways: a run's replay exported as a local Minari dataset is one that
`minari.load_dataset` reads (episodes, lengths, observations, actions) and that loads back through
the dataset loader bit for bit, from states and from pixels; another Minari dataset loads as an
ExORL file does, with the same checks and messages; an id that is not installed, a malformed or
taken id and a missing minari package are errors that say so; `choreo pretrain --offline
minari:ID` trains on one."""

from __future__ import annotations

import hashlib
import json
import sys

import gymnasium
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from choreo import vocabulary as B
from choreo.buffer.dataset import (FIRST_ACTION, FIRST_REWARD, DatasetError, EpisodeSpec, export_minari, load_into,
                                   open_dataset, split_episodes)
from choreo.buffer.shard import ReplayShard
from choreo.launch import cli
from choreo.launch.runtime.build import load_dataset, make_shard
from choreo.launch.runtime.config import load_config
from choreo.launch.runtime.rundir import RunDir

OBS, ACT = 24, 6  # walker from states
SPEC = EpisodeSpec((OBS,), ACT, "walker_stand")
PIXELS = (3, 64, 64)


@pytest.fixture(autouse=True)
def minari_datasets(tmp_path, monkeypatch):
    """Minari's local datasets folder, a fresh one per test."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def worker_replay(capacity: int, obs_shape: tuple[int, ...] = (OBS,), steps: int = 64) -> ReplayShard:
    """A shard filled as environment workers fill it: three streams in chunks of 8, episodes of 20
    steps, FIFO eviction (runs whose start was evicted) and unfinished episodes."""
    shard = ReplayShard(capacity, seed=0)
    rng = np.random.default_rng(0)
    for t0 in range(0, steps, 8):
        for stream in range(3):
            pos = np.arange(t0, t0 + 8) + 5 * stream
            obs = (rng.integers(0, 256, (8, *obs_shape), dtype=np.uint8) if len(obs_shape) == 3
                   else rng.normal(size=(8, *obs_shape)).astype(np.float32))
            chunk = {B.OBSERVATION: obs, B.ACTION: rng.uniform(-1, 1, (8, ACT)).astype(np.float32),
                     B.REWARD: rng.normal(size=8).astype(np.float32),
                     B.DISCOUNT: np.where(pos % 40 == 39, 0, 1).astype(np.float32),
                     B.IS_FIRST: pos % 20 == 0, B.IS_LAST: pos % 20 == 19, B.IS_TERMINAL: pos % 40 == 39,
                     B.SKILL: rng.integers(-1, 8, 8).astype(np.int32),
                     B.POLICY_VERSION: rng.integers(-1, 50, 8).astype(np.int64)}
            shard.add(chunk, stream)
    return shard


def digest(episode: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(episode):
        h.update(key.encode() + episode[key].dtype.str.encode() + str(episode[key].shape).encode())
        h.update(np.ascontiguousarray(episode[key]).tobytes())
    return h.hexdigest()


def loaded_back(location: str, shards: int, spec: EpisodeSpec = SPEC) -> list[dict[str, np.ndarray]]:
    source = open_dataset(location)
    held = []
    for part in split_episodes(source.episodes(), shards):
        shard = ReplayShard(10_000, seed=1)
        summary = load_into(shard, source, part, spec)
        assert summary.skipped == [] and summary.warnings == []
        held.extend(shard.episodes())
    return held


# ----------------------------------------------------------------------------- the round trip


def test_a_replay_exported_to_minari_is_a_minari_dataset_and_loads_back_bit_for_bit():
    runs = list(worker_replay(capacity=150).episodes())
    assert any(not r[B.IS_FIRST][0] for r in runs) and any(not r[B.IS_LAST][-1] for r in runs)
    assert any(r[B.IS_TERMINAL][-1] for r in runs) and any(r[B.IS_LAST][-1] and not r[B.IS_TERMINAL][-1] for r in runs)
    one_step = {key: value[:1] for key, value in runs[0].items()}
    result = export_minari(iter([*runs, one_step]), "choreo/walker-v0")
    steps = sum(len(r[B.OBSERVATION]) for r in runs)
    assert (result["episodes"], result["steps"], result["left_out"]) == (len(runs), steps, 1)

    dataset = minari.load_dataset("choreo/walker-v0")
    assert dataset.total_episodes == len(runs)
    assert dataset.total_steps == sum(len(r[B.ACTION]) - 1 for r in runs)
    assert dataset.observation_space == gymnasium.spaces.Box(-np.inf, np.inf, (OBS,), np.float32)
    assert dataset.action_space == gymnasium.spaces.Box(-1, 1, (ACT,), np.float32)
    for episode, run in zip(dataset.iterate_episodes(), runs):
        assert len(episode) == len(run[B.ACTION]) - 1 and len(episode.observations) == len(run[B.OBSERVATION])
        np.testing.assert_array_equal(episode.observations, run[B.OBSERVATION])
        np.testing.assert_array_equal(episode.actions, run[B.ACTION][1:])
        np.testing.assert_array_equal(episode.rewards, run[B.REWARD][1:])
        np.testing.assert_array_equal(episode.terminations, run[B.IS_TERMINAL][1:])
        # A run the replay holds unfinished ends, for Minari, truncated at its last step.
        assert episode.truncations[-1] == (not run[B.IS_TERMINAL][-1]) and not episode.truncations[:-1].any()
        np.testing.assert_array_equal(episode.infos[FIRST_ACTION], run[B.ACTION][:1])
        np.testing.assert_array_equal(episode.infos[FIRST_REWARD], run[B.REWARD][:1])

    for shards in (1, 2):
        back = loaded_back("minari:choreo/walker-v0", shards)
        assert sorted(map(digest, back)) == sorted(map(digest, runs))


def test_pixel_replays_go_to_minari_and_back_unchanged():
    runs = list(worker_replay(capacity=60, obs_shape=PIXELS, steps=32).episodes())
    assert runs[0][B.OBSERVATION].dtype == np.uint8
    export_minari(iter(runs), "choreo/pixels-v0")
    dataset = minari.load_dataset("choreo/pixels-v0")
    assert dataset.observation_space == gymnasium.spaces.Box(0, 255, PIXELS, np.uint8)
    first = dataset[0]
    assert first.observations.dtype == np.uint8 and first.observations.shape == (len(runs[0][B.OBSERVATION]), *PIXELS)
    back = loaded_back("minari:choreo/pixels-v0", 1, EpisodeSpec(PIXELS, ACT))
    assert sorted(map(digest, back)) == sorted(map(digest, runs))  # no JPEG: frames bit for bit


def test_choreo_export_format_minari_writes_a_runs_replay_that_pretrain_offline_trains_on(tmp_path, capsys):
    config = load_config(["tiny"], ["num_shards=2"])
    run_dir = tmp_path / "walker run"
    RunDir(run_dir).write_config(config)
    sources = [worker_replay(config.replay.capacity // 2) for _ in range(2)]
    for i, shard in enumerate(sources):
        shard.name = f"shard{i}"
        shard.save(run_dir / "replay")
    runs = [run for shard in sources for run in shard.episodes()]

    assert cli.main(["export", str(run_dir), "--format", "minari"]) == 0
    out = capsys.readouterr().out
    assert "as the Minari dataset choreo/walker_run-v0" in out and "--offline minari:choreo/walker_run-v0" in out
    assert cli.main(["export", str(run_dir), "--format", "minari", "--dataset-id", "choreo/walker_run-v0"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "--format", "minari", "--dataset-id", "walker"]) == 2
    assert "not a Minari dataset id" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "--format", "minari", "--out", str(tmp_path / "o")]) == 2
    assert "MINARI_DATASETS_PATH" in capsys.readouterr().err
    assert cli.main(["export", str(run_dir), "--dataset-id", "choreo/x-v0", "--out", str(tmp_path / "o")]) == 2
    assert "--format minari" in capsys.readouterr().err

    offline = load_config(["tiny"], ["dataset.dir=minari:choreo/walker_run-v0", "num_shards=1",
                                     "replay.capacity=10000"])
    shard = make_shard(offline, 0)
    assert load_dataset(offline, [shard], (OBS,), ACT) == sum(len(r[B.OBSERVATION]) for r in runs)
    assert sorted(map(digest, shard.episodes())) == sorted(map(digest, runs))
    assert "dataset minari:choreo/walker_run-v0: loaded" in capsys.readouterr().out

    assert cli.main(["pretrain", "--local", "--offline", "minari:choreo/walker_run-v0", "--preset", "tiny",
                     "--logdir", str(tmp_path / "runs"), "run_name=off", "learner.total_updates=2"]) == 0
    assert f"loaded {len(runs)} episodes" in capsys.readouterr().out
    saved = (tmp_path / "runs" / "off" / "config.yaml").read_text()
    assert "minari:choreo/walker_run-v0" in saved


# ----------------------------------------------------------------------------- other Minari datasets


def make_minari(dataset_id: str, episodes: list[dict], observation_space: gymnasium.Space,
                action_space: gymnasium.Space) -> None:
    """A Minari dataset as Minari's own tools write one: no choreo fields in infos."""
    buffers = [EpisodeBuffer(observations=e["observations"], actions=e["actions"], rewards=e["rewards"],
                             terminations=e["terminations"], truncations=e["truncations"], infos=e.get("infos"))
               for e in episodes]
    with pytest.warns(UserWarning):  # Minari asks for an author, a code link, ...
        minari.create_dataset_from_buffers(dataset_id, buffers, observation_space=observation_space,
                                           action_space=action_space)


def foreign_episode(steps: int, seed: int, terminated: bool, act_dim: int = ACT) -> dict:
    """An episode that ends terminated or truncated, with an info of its own."""
    rng = np.random.default_rng(seed)
    ends, goes_on = np.zeros(steps, bool), np.zeros(steps, bool)
    ends[-1] = True
    return {"observations": rng.normal(size=(steps + 1, OBS)),  # float64, as many datasets hold them
            "actions": rng.uniform(-1, 1, (steps, act_dim)).astype(np.float32), "rewards": rng.normal(size=steps),
            "terminations": ends if terminated else goes_on, "truncations": goes_on if terminated else ends,
            "infos": {"success": np.zeros(steps + 1, bool)}}


def test_another_minari_dataset_loads_as_an_exorl_episode_does():
    episodes = [foreign_episode(12, 0, terminated=True), foreign_episode(9, 1, terminated=False)]
    make_minari("other/walker-v0", episodes, gymnasium.spaces.Box(-np.inf, np.inf, (OBS,), np.float64),
                gymnasium.spaces.Box(-1, 1, (ACT,), np.float32))
    back = loaded_back("minari:other/walker-v0", 1)
    assert [len(e[B.OBSERVATION]) for e in back] == [13, 10]
    for chunk, episode in zip(back, episodes):
        assert chunk[B.OBSERVATION].dtype == np.float32
        np.testing.assert_array_equal(chunk[B.OBSERVATION], episode["observations"].astype(np.float32))
        np.testing.assert_array_equal(chunk[B.ACTION][1:], episode["actions"])
        assert not chunk[B.ACTION][0].any() and chunk[B.REWARD][0] == 0
        np.testing.assert_array_equal(chunk[B.REWARD][1:], episode["rewards"].astype(np.float32))
        assert chunk[B.IS_FIRST].tolist() == [True] + [False] * (len(chunk[B.IS_FIRST]) - 1)
        assert chunk[B.IS_LAST].tolist() == [False] * (len(chunk[B.IS_LAST]) - 1) + [True]
        assert (chunk[B.SKILL] == -1).all() and (chunk[B.POLICY_VERSION] == -1).all()
    assert back[0][B.IS_TERMINAL][-1] and back[0][B.DISCOUNT][-1] == 0 and back[0][B.DISCOUNT][:-1].all()
    assert not back[1][B.IS_TERMINAL].any() and back[1][B.DISCOUNT].all()


def test_minari_episodes_that_do_not_fit_are_skipped_by_name_with_the_npz_messages(capsys):
    make_minari("other/wrong-action-v0", [foreign_episode(5, i, True, act_dim=4) for i in range(2)],
                gymnasium.spaces.Box(-np.inf, np.inf, (OBS,), np.float64),
                gymnasium.spaces.Box(-1, 1, (4,), np.float32))
    source = open_dataset("minari:other/wrong-action-v0")
    summary = load_into(ReplayShard(1000, 0), source, source.episodes(), SPEC)
    assert summary.skipped == [(f"episode {i}", "action has size 4, but the task walker_stand takes 6")
                               for i in range(2)]
    assert "2 episodes skipped" in summary.line(source.location)
    config = load_config(["tiny"], ["dataset.dir=minari:other/wrong-action-v0", "num_shards=1"])
    with pytest.raises(DatasetError, match="no episode could be loaded \\(2 episodes skipped"):
        load_dataset(config, [make_shard(config, 0)], (OBS,), ACT)
    assert ("skipped minari:other/wrong-action-v0 episode 1: action has size 4, but the task walker_stand takes 6"
            in capsys.readouterr().out)

    space = gymnasium.spaces.Dict({"observation": gymnasium.spaces.Box(-1, 1, (OBS,), np.float32),
                                   "goal": gymnasium.spaces.Box(-1, 1, (2,), np.float32)})
    rng = np.random.default_rng(0)
    make_minari("other/dict-v0", [{"observations": {"observation": rng.uniform(-1, 1, (4, OBS)).astype(np.float32),
                                                    "goal": np.zeros((4, 2), np.float32)},
                                   "actions": np.zeros((3, ACT), np.float32), "rewards": np.zeros(3),
                                   "terminations": np.zeros(3, bool), "truncations": np.array([0, 0, 1], bool)}],
                space, gymnasium.spaces.Box(-1, 1, (ACT,), np.float32))
    source = open_dataset("minari:other/dict-v0")
    summary = load_into(ReplayShard(1000, 0), source, source.episodes(), SPEC)
    assert summary.skipped[0][0] == "episode 0" and "observations are a dict, not one array" in summary.skipped[0][1]


# ----------------------------------------------------------------------------- errors


def test_an_id_that_is_not_installed_locally_is_named_with_the_folder_and_nothing_is_downloaded(
        tmp_path, minari_datasets, capsys):
    with pytest.raises(DatasetError) as error:
        open_dataset("minari:D4RL/door/human-v2")
    message = str(error.value)
    assert "D4RL/door/human-v2 is not installed locally" in message and str(minari_datasets) in message
    assert "nothing is downloaded" in message
    assert not (minari_datasets / "D4RL").exists()

    assert cli.main(["pretrain", "--local", "--offline", "minari:D4RL/door/human-v2", "--preset", "tiny",
                     "--logdir", str(tmp_path / "runs")]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(DatasetError, match="not a Minari dataset id"):
        open_dataset("minari:no version")


def test_a_dataset_whose_metadata_lacks_its_spaces_is_refused_without_building_its_environment(minari_datasets):
    export_minari(worker_replay(100).episodes(), "choreo/spaces-v0")
    metadata_file = minari_datasets / "choreo" / "spaces-v0" / "data" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    del metadata["observation_space"]
    metadata["env_spec"] = json.dumps({"id": "Evil-v0", "entry_point": "os:system", "kwargs": {"command": "false"}})
    metadata_file.write_text(json.dumps(metadata))
    with pytest.raises(DatasetError, match=r"lacks \['observation_space'\].*never run code"):
        open_dataset("minari:choreo/spaces-v0")


def test_without_minari_both_ways_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    config = load_config(["tiny"], [])
    run_dir = tmp_path / "run"
    RunDir(run_dir).write_config(config)
    shard = worker_replay(config.replay.capacity)
    shard.name = "shard0"
    shard.save(run_dir / "replay")
    monkeypatch.setitem(sys.modules, "minari", None)  # `import minari` raises ImportError

    with pytest.raises(DatasetError, match=r"pip install 'choreo\[minari\]'"):
        open_dataset("minari:choreo/walker-v0")
    assert cli.main(["export", str(run_dir), "--format", "minari"]) == 2
    assert "pip install 'choreo[minari]'" in capsys.readouterr().err
    assert cli.main(["pretrain", "--local", "--offline", "minari:choreo/walker-v0", "--preset", "tiny",
                     "--logdir", str(tmp_path / "runs")]) == 2
    assert "pip install 'choreo[minari]'" in capsys.readouterr().err
