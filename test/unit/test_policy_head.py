"""Action head, checkpoints, the inference runner and the instruction embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fovea_vla.core.policy.checkpoint import (
    SCHEMA_VERSION,
    CheckpointError,
    PolicySpec,
    load_policy,
    read_spec,
    save_policy,
)
from fovea_vla.core.policy.head import ActionHead, ActionHeadConfig, ActionHeadEnsemble
from fovea_vla.core.policy.runner import ActionHeadRunner, RunnerConfig

HEAD = ActionHeadConfig(
    token_dim=32,
    instruction_dim=24,
    state_dim=8,
    action_dim=8,
    chunk_size=6,
    width=64,
    depth=2,
    num_heads=4,
    delta_state_indices=(0, 1, 2, 3, 4, 5, 6, -1),
)
JOINTS = tuple(f"joint{i}" for i in range(1, 8))


def make_spec(head: ActionHeadConfig = HEAD, **changes) -> PolicySpec:
    values = dict(
        head=head,
        action_space="joint_position",
        action_names=(*JOINTS, "gripper"),
        state_names=(*JOINTS, "gripper"),
        step_s=0.1,
        encoder_architecture="vit_tiny_patch16",
        text_encoder="all-MiniLM-L6-v2",
        provenance={"seed": 3},
    )
    values.update(changes)
    return PolicySpec(**values)


def make_model(seed: int = 3) -> ActionHead:
    model = ActionHead.from_config(HEAD, seed=seed)
    rng = np.random.default_rng(seed)
    model.set_normalization(
        rng.normal(size=8), rng.uniform(0.5, 2, 8), rng.normal(size=8) * 0.1, rng.uniform(0.1, 1, 8)
    )
    return model.eval()


def inputs(n_tokens: int = 20, seed: int = 0):
    """(tokens, positions, instruction, state), batch 1."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, n_tokens, 32, generator=g),
        torch.rand(1, n_tokens, 3, generator=g),
        torch.randn(1, 24, generator=g),
        torch.randn(1, 8, generator=g),
    )


def test_forward_shapes_and_delta_dims_follow_the_state():
    model = make_model()
    tokens, positions, instruction, state = inputs()
    actions = model(tokens, positions, instruction, state)
    assert actions.shape == (1, 6, 8) and actions.dtype == torch.float32
    # forward() is the normalised output mapped back to robot units, state added on the delta dims.
    out = model.forward_normalized(tokens, positions, instruction, state)
    torch.testing.assert_close(model.targets(actions, state), out, rtol=1e-5, atol=1e-5)


def test_latent_resampler_keeps_shapes_and_round_trips(tmp_path):
    head = ActionHeadConfig(**{**HEAD.to_dict(), "delta_state_indices": HEAD.delta_state_indices, "num_latents": 8})
    model = ActionHead.from_config(head, seed=2).eval()
    tokens, positions, instruction, state = inputs(n_tokens=50)
    actions = model(tokens, positions, instruction, state)
    assert actions.shape == (1, 6, 8)
    # The image enters only through the latents: other tokens, or the same tokens elsewhere, change the chunk.
    assert not torch.allclose(model(inputs(n_tokens=50, seed=9)[0], positions, instruction, state), actions)
    assert not torch.allclose(model(tokens, positions.flip(1), instruction, state), actions)
    save_policy(tmp_path / "ckpt", model, make_spec(head))
    loaded, spec = load_policy(tmp_path / "ckpt")
    assert spec.head.num_latents == 8
    torch.testing.assert_close(loaded(tokens, positions, instruction, state), actions, rtol=0, atol=0)


def test_instruction_latents_condition_the_resampler_and_round_trip(tmp_path):
    fields = {**HEAD.to_dict(), "delta_state_indices": HEAD.delta_state_indices, "num_latents": 8}
    head = ActionHeadConfig(**{**fields, "instruction_latents": True})
    model = ActionHead.from_config(head, seed=2).eval()
    batch = inputs(n_tokens=50)
    actions = model(*batch)
    # The only difference from the plain head is the instruction's projection added to the latents' queries.
    plain = ActionHead.from_config(ActionHeadConfig(**fields), seed=2).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("latent_instruction.")})
    assert not torch.allclose(plain(*batch), actions)
    with torch.no_grad():
        model.latent_instruction.weight.zero_()
        model.latent_instruction.bias.zero_()
    torch.testing.assert_close(model(*batch), plain(*batch), rtol=0, atol=0)
    save_policy(tmp_path / "ckpt", ActionHead.from_config(head, seed=2), make_spec(head))
    loaded, spec = load_policy(tmp_path / "ckpt")
    assert spec.head.instruction_latents
    torch.testing.assert_close(loaded(*batch), actions, rtol=0, atol=0)


def test_checkpoints_without_instruction_latents_or_aux_still_load():
    values = HEAD.to_dict()
    del values["instruction_latents"], values["aux_dim"]
    assert ActionHeadConfig.from_dict(values) == HEAD


def test_auxiliary_output_round_trips_and_keeps_float32_statistics(tmp_path):
    """aux_dim adds one query position read out through aux_out; its normalisation travels in the checkpoint
    and stays float32 in a half-precision head."""
    fields = {**HEAD.to_dict(), "delta_state_indices": HEAD.delta_state_indices}
    head = ActionHeadConfig(**{**fields, "aux_dim": 4})
    model = ActionHead.from_config(head, seed=2).eval()
    model.set_aux_normalization([0.5, 0.1, 0.4, -0.2], [0.1, 0.2, 0.05, 0.3])
    batch = inputs(n_tokens=30)
    actions, aux = model.forward_normalized_with_aux(*batch)
    assert actions.shape == (1, 6, 8) and aux.shape == (1, 4)
    torch.testing.assert_close(model.forward_aux(*batch), aux * model.aux_std + model.aux_mean)
    save_policy(tmp_path / "ckpt", model, make_spec(head))
    loaded, spec = load_policy(tmp_path / "ckpt")
    assert spec.head.aux_dim == 4
    torch.testing.assert_close(loaded.forward_aux(*batch), model.forward_aux(*batch), rtol=0, atol=0)
    torch.testing.assert_close(loaded(*batch), model(*batch), rtol=0, atol=0)
    loaded.half_precision(torch.bfloat16)
    assert loaded.aux_mean.dtype == loaded.aux_std.dtype == torch.float32
    with pytest.raises(ValueError, match="no auxiliary outputs"):
        make_model().forward_aux(*batch)
    with pytest.raises(ValueError, match="no auxiliary outputs"):
        make_model().set_aux_normalization([0.0], [1.0])


def test_targets_invert_forward_for_absolute_and_delta_dims():
    model = make_model()
    state = inputs(seed=1)[3]
    actions = torch.randn(1, 6, 8)
    normalized = model.targets(actions, state)
    rebuilt = normalized * model.action_std + model.action_mean + model._state_offset(state)
    torch.testing.assert_close(rebuilt, actions, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    model, spec = make_model(), make_spec()
    save_policy(tmp_path / "ckpt", model, spec)
    loaded, loaded_spec = load_policy(tmp_path / "ckpt")
    assert loaded_spec == spec
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    batch = inputs()
    torch.testing.assert_close(loaded(*batch), model(*batch), rtol=0, atol=0)
    document = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert document["schema_version"] == SCHEMA_VERSION and document["format"] == "fovea_vla.policy"


def test_ensemble_averages_its_members_chunks_and_round_trips(tmp_path):
    """An ensemble's chunk is the mean of its members' chunks in robot units (each member has its own
    normalisation); it saves with ensemble_size and loads back bit-identical, also through the runner."""
    members = [make_model(seed=3), make_model(seed=4), make_model(seed=5)]
    ensemble = ActionHeadEnsemble(members).eval()
    batch = inputs(n_tokens=11)
    chunks = [member(*batch) for member in members]
    assert not torch.allclose(chunks[0], chunks[1])
    torch.testing.assert_close(ensemble(*batch), (chunks[0] + chunks[1] + chunks[2]) / 3)
    assert ensemble.cfg == HEAD
    save_policy(tmp_path / "ckpt", ensemble, make_spec(ensemble_size=3))
    loaded, spec = load_policy(tmp_path / "ckpt")
    assert isinstance(loaded, ActionHeadEnsemble) and spec.ensemble_size == 3
    torch.testing.assert_close(loaded(*batch), ensemble(*batch), rtol=0, atol=0)
    runner = ActionHeadRunner(loaded, RunnerConfig(device="cpu"))
    out = runner.predict(batch[0][0], batch[1][0].numpy(), batch[2][0].numpy(), batch[3][0].numpy())
    np.testing.assert_allclose(out.actions, ensemble(*batch)[0].detach().double().numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(CheckpointError, match="3 head"):
        save_policy(tmp_path / "other", ensemble, make_spec())
    with pytest.raises(ValueError, match="at least 2"):
        ActionHeadEnsemble([make_model()])
    fields = {**HEAD.to_dict(), "delta_state_indices": HEAD.delta_state_indices}
    wider = ActionHead.from_config(ActionHeadConfig(**{**fields, "width": 32}), seed=0)
    with pytest.raises(ValueError, match="member 1 has config"):
        ActionHeadEnsemble([make_model(), wider])
    with pytest.raises(ValueError, match="ensemble_size=0"):
        make_spec(ensemble_size=0)


def test_policy_ensemble_command_combines_checkpoints_and_refuses_mismatches(tmp_path, capsys):
    from fovea_vla.cli import main

    save_policy(tmp_path / "a", make_model(seed=3), make_spec(trained=True, provenance={"seed": 0, "encoder_depth": 1}))
    save_policy(tmp_path / "b", make_model(seed=4), make_spec(trained=True, provenance={"seed": 1, "encoder_depth": 1}))
    assert main(["policy", "ensemble", "--out", str(tmp_path / "ab"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "ensemble of 2 heads" in capsys.readouterr().out
    model, spec = load_policy(tmp_path / "ab")
    assert spec.ensemble_size == 2 and [m["seed"] for m in spec.provenance["members"]] == [0, 1]
    assert spec.provenance["encoder_depth"] == 1
    batch = inputs()
    torch.testing.assert_close(model(*batch), (make_model(seed=3)(*batch) + make_model(seed=4)(*batch)) / 2)
    # an ensemble given as a member contributes its heads
    assert main(["policy", "ensemble", "--out", str(tmp_path / "abb"), str(tmp_path / "ab"), str(tmp_path / "b")]) == 0
    assert load_policy(tmp_path / "abb")[1].ensemble_size == 3
    save_policy(tmp_path / "c", make_model(), make_spec(trained=True, step_s=0.2))
    with pytest.raises(CheckpointError, match=r"has step_s=0\.2"):
        main(["policy", "ensemble", "--out", str(tmp_path / "ac"), str(tmp_path / "a"), str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="at least 2"):
        main(["policy", "ensemble", "--out", str(tmp_path / "one"), str(tmp_path / "a")])
    save_policy(tmp_path / "d", make_model(), make_spec(trained=True, provenance={"encoder_depth": 12}))
    with pytest.raises(CheckpointError, match="different encoder depths"):
        main(["policy", "ensemble", "--out", str(tmp_path / "ad"), str(tmp_path / "a"), str(tmp_path / "d")])


def test_mismatched_weights_are_refused_with_the_tensor_named(tmp_path):
    save_policy(tmp_path / "ckpt", make_model(), make_spec())
    config = tmp_path / "ckpt" / "config.json"
    document = json.loads(config.read_text())
    document["head"]["width"] = 128  # the weights were saved at width 64
    config.write_text(json.dumps(document))
    with pytest.raises(
        CheckpointError, match=r"token_proj.weight has shape \(64, 32\), config.json implies \(128, 32\)"
    ):
        load_policy(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schema_version", 2, "schema_version=2, this fovea_vla reads version 1 .*newer"),
        ("schema_version", None, "schema_version=None"),
        ("format", "lerobot", "format='lerobot', expected 'fovea_vla.policy'"),
        ("action_space", "torque", "action_space='torque'"),
        ("step_s", -1, "step_s=-1"),
    ],
)
def test_bad_config_fields_are_refused(tmp_path, field, value, message):
    save_policy(tmp_path / "ckpt", make_model(), make_spec())
    config = tmp_path / "ckpt" / "config.json"
    document = json.loads(config.read_text())
    document[field] = value
    config.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=message):
        read_spec(tmp_path / "ckpt")


def test_missing_pieces_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_policy(tmp_path / "absent")
    save_policy(tmp_path / "ckpt", make_model(), make_spec())
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_policy(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_spec(tmp_path / "ckpt")


def test_compatibility_checks_name_the_mismatch():
    spec = make_spec()
    spec.check_compatible(encoder_architecture="vit_tiny_patch16", token_dim=32, action_names=(*JOINTS, "gripper"))
    with pytest.raises(CheckpointError, match=r"encoder\.architecture=.vit_tiny_patch16. but this node runs"):
        spec.check_compatible(encoder_architecture="vit_base_patch16")
    with pytest.raises(CheckpointError, match="state_names"):
        spec.check_compatible(state_names=("a",) * 8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 63}, "policy.width=63: must be divisible"),
        ({"chunk_size": 0}, "policy.chunk_size=0"),
        ({"delta_state_indices": (0, 1)}, "policy.delta_state_indices"),
        ({"delta_state_indices": (9,) * 8}, "policy.delta_state_indices"),
        ({"mlp_ratio": -1.0}, "policy.mlp_ratio"),
        ({"instruction_latents": True}, r"policy.instruction_latents=True: must be a bool \(true needs num_latents"),
        ({"aux_dim": -1}, r"policy.aux_dim=-1: must be an integer in \[0, 1024\]"),
    ],
)
def test_config_validation_names_the_field(changes, message):
    values = HEAD.to_dict() | changes
    values["delta_state_indices"] = tuple(values["delta_state_indices"])
    with pytest.raises(ValueError, match=message):
        ActionHeadConfig(**values)


def test_runner_matches_the_module_on_cpu():
    model = make_model()
    tokens, positions, instruction, state = inputs(n_tokens=17)
    expected = model(tokens, positions, instruction, state)[0].detach().double().numpy()
    runner = ActionHeadRunner(make_model(), RunnerConfig(device="cpu"))
    out = runner.predict(tokens[0], positions[0].numpy(), instruction[0].numpy(), state[0].numpy())
    assert out.actions.shape == (6, 8) and out.actions.dtype == np.float64 and out.device_ms is None
    np.testing.assert_allclose(out.actions, expected, rtol=1e-6, atol=1e-6)


def test_runner_refuses_bad_inputs():
    runner = ActionHeadRunner(make_model(), RunnerConfig(device="cpu"))
    tokens, positions, instruction, state = inputs()
    with pytest.raises(ValueError, match="state holds NaN"):
        runner.predict(tokens[0], positions[0], instruction[0], np.full(8, np.nan))
    with pytest.raises(ValueError, match=r"tokens must be \(N, 32\)"):
        runner.predict(torch.zeros(5, 31), positions[0, :5], instruction[0], state[0])
    with pytest.raises(ValueError, match="state must have 8 values"):
        runner.predict(tokens[0], positions[0], instruction[0], np.zeros(3))
    with pytest.raises(ValueError, match=r"positions must be \(20, 3\)"):
        runner.predict(tokens[0], positions[0, :5], instruction[0], state[0])


@pytest.mark.gpu
def test_runner_cuda_graphs_match_eager_fp32_and_fp16():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    tokens, positions, instruction, state = inputs(n_tokens=273)
    reference = make_model()(tokens, positions, instruction, state)[0].detach().double().numpy()
    eager = ActionHeadRunner(make_model(), RunnerConfig(device="cuda", dtype="float32", cuda_graphs=False))
    graphs32 = ActionHeadRunner(make_model(), RunnerConfig(device="cuda", dtype="float32"))
    graphs16 = ActionHeadRunner(make_model(), RunnerConfig(device="cuda"))
    assert graphs16.dtype == torch.float16
    cuda_tokens = tokens[0].cuda()
    args = (positions[0], instruction[0], state[0])
    np.testing.assert_allclose(eager.predict(cuda_tokens, *args).actions, reference, atol=1e-4)
    for _ in range(3):  # capture, then replays with new inputs copied in
        out = graphs32.predict(cuda_tokens, *args)
        assert out.graph and out.device_ms is not None
        np.testing.assert_allclose(out.actions, reference, atol=1e-4)
    other = inputs(n_tokens=273, seed=5)
    np.testing.assert_allclose(
        graphs32.predict(other[0][0].cuda(), other[1][0], other[2][0], other[3][0]).actions,
        make_model()(*other)[0].detach().double().numpy(),
        atol=1e-4,
    )
    half = graphs16.predict(cuda_tokens, *args).actions
    scale = np.abs(reference).max()
    assert np.abs(half - reference).max() <= 2e-2 * scale
    assert graphs32.graph_token_counts == [273]
    # an ensemble is captured and replayed as one module, in fp16 too (normalisation stays float32)
    ensemble_reference = ActionHeadEnsemble([make_model(3), make_model(4)])(tokens, positions, instruction, state)
    for dtype in ("float32", "float16"):
        runner = ActionHeadRunner(
            ActionHeadEnsemble([make_model(3), make_model(4)]), RunnerConfig(device="cuda", dtype=dtype)
        )
        for _ in range(2):
            out = runner.predict(cuda_tokens, *args)
            assert out.graph
        tolerance = 1e-4 if dtype == "float32" else 2e-2 * scale
        np.testing.assert_allclose(out.actions, ensemble_reference[0].detach().double().numpy(), atol=tolerance)
