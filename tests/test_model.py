"""V1T model: config validation, parameter counts, image stage, golden values, bf16 / fused."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from image_reference import grid_sample_crop_then_resize

from configs import default
from v1t_jax import image_stage
from v1t_jax import model as v1t_model

SENSORIUM_PLUS_NEURONS = (7538, 8372, 7344, 7334, 8107, 8098)  # S1, A-E
TINY = dict(patch_size=4, patch_stride=4, emb_dim=8, num_heads=2, num_blocks=2, mlp_dim=16)




def tiny_model(counts=(3, 5), **overrides):
  config = v1t_model.ModelConfig(**{**TINY, **overrides})
  coordinates = np.random.default_rng(0).normal(size=(len(counts), max(counts), 3))
  return v1t_model.V1T(config, neuron_counts=counts, coordinates=coordinates,
                       image_shape=(12, 16, 1), rngs=nnx.Rngs(0))


def tiny_inputs(mice=2, batch=3):
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.normal(size=(mice, batch, 12, 16, 1)), jnp.float32),
          jnp.asarray(rng.normal(size=(mice, batch, 3)), jnp.float32),
          jnp.asarray(rng.normal(size=(mice, batch, 2)), jnp.float32))


@nnx.jit(static_argnames=("train", "attention"))
def forward(model, inputs, key, train, attention=False):
  """Full float32 matmuls for float32 models (parity), the default precision for bf16 ones."""
  exact = model.config.compute_dtype == "float32"
  with jax.default_matmul_precision("float32") if exact else contextlib.nullcontext():
    pred, aux = model(*inputs, train=train, key=key, return_attention=attention)
  return (pred, aux) if attention else pred


def reference_pred(model, inputs):
  """Eval prediction through the program that also returns the attention (compiled once)."""
  return np.asarray(forward(model, inputs, None, False, True)[0])


# ---------------------------------------------------------------------------------------------
# Config.


def test_config_defaults_match_configs_default():
  assert v1t_model.ModelConfig.from_config(default.get_config().model) == v1t_model.ModelConfig()


@pytest.mark.parametrize("field, value, message", [
    ("behavior_mode", 5, r"behavior_mode must be one of \(0, 1, 2, 3, 4\)"),
    ("shift_mode", 1, r"image shifter .* out of scope; allowed: \(0, 2\)"),
    ("shift_mode", 4, r"image shifter .* out of scope"),
    ("patch_mode", 2, r"not ported"),
    ("compute_dtype", "float16", r"compute_dtype must be one of \('float32', 'bfloat16'\)"),
    ("attention", "flash", r"attention must be one of \('explicit', 'fused'\)"),
    ("core", "resnet", r"core must be one of \('vit', 'stacked2d'\)"),
])
def test_invalid_modes_raise_value_error_listing_allowed_values(field, value, message):
  with pytest.raises(ValueError, match=message):
    v1t_model.ModelConfig(**{field: value})
  config = default.get_config().model
  config[field] = value
  with pytest.raises(ValueError, match=message):
    v1t_model.ModelConfig.from_config(config)


def test_unknown_config_field_raises():
  with pytest.raises(ValueError, match=r"unknown model config fields: \['emb_dims'\]"):
    v1t_model.ModelConfig.from_config({"emb_dims": 3})


# ---------------------------------------------------------------------------------------------
# Parameter counts of the original (model_spec.md §10.1), abstract init: no parameter memory.


def default_counts(behavior_mode):
  counts = SENSORIUM_PLUS_NEURONS
  coordinates = np.random.default_rng(0).normal(size=(6, max(counts), 3))
  config = v1t_model.ModelConfig(behavior_mode=behavior_mode)
  model = nnx.eval_shape(lambda: v1t_model.V1T(
      config, neuron_counts=counts, coordinates=coordinates, rngs=nnx.Rngs(0)))
  return v1t_model.count_parameters(model)


@pytest.mark.parametrize("behavior_mode, core", [
    (3, 2_465_200), (0, 2_414_992), (1, 2_444_752), (2, 2_464_584), (4, 2_716_240)])
def test_parameter_counts_match_original(behavior_mode, core):
  counts = default_counts(behavior_mode)
  assert counts["core"] == core
  assert counts["readouts"] == sum(160 * n + 152 for n in SENSORIUM_PLUS_NEURONS)
  assert counts["shifters"] == 6 * 57
  if behavior_mode == 3:
    assert counts["total"] == 9_953_334
  assert [160 * n + 152 for n in SENSORIUM_PLUS_NEURONS] == [
      1_206_232, 1_339_672, 1_175_192, 1_173_592, 1_297_272, 1_295_832]


def test_stacked2d_core_counts_and_behavior_modes():
  """The CNN core behind the same readouts: its default count (stacked2d.py's test derives
  40,256 by hand), 3 more input channels with behaviour as channels, readouts of width 64."""
  counts = SENSORIUM_PLUS_NEURONS
  coordinates = np.random.default_rng(0).normal(size=(6, max(counts), 3))
  for mode, core in ((0, 40_256), (1, 40_256 + 3 * 64 * 81)):
    config = v1t_model.ModelConfig(core="stacked2d", behavior_mode=mode)
    model = nnx.eval_shape(lambda config=config: v1t_model.V1T(
        config, neuron_counts=counts, coordinates=coordinates, rngs=nnx.Rngs(0)))
    got = v1t_model.count_parameters(model)
    assert got["core"] == core
    assert got["readouts"] == sum((64 + 5) * n + 152 for n in counts)
    assert model.core.output_shape == (28, 56, 64)
  with pytest.raises(ValueError, match="core='stacked2d' takes behavior_mode 0 or 1, got 3"):
    v1t_model.ModelConfig(core="stacked2d")
  model = tiny_model(core="stacked2d", behavior_mode=0,
                     stacked2d={"num_layers": 2, "hidden_channels": 4, "input_kern": 3,
                                "hidden_kern": 3})
  with pytest.raises(ValueError, match="the stacked2d core has no attention maps"):
    model(*tiny_inputs(), train=False, return_attention=True)


# ---------------------------------------------------------------------------------------------
# Image stage.


def test_crop_resize_equals_block_mean():
  images = np.random.default_rng(0).normal(size=(2, 144, 256, 3)).astype(np.float32)
  out = v1t_model.crop_resize(jnp.asarray(images))
  expected = image_stage.block_mean_reference(images.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
  assert out.shape == (2, 36, 64, 3)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  for center_crop, out_hw in ((0.5, None), (0.8, (36, 64)), (0.63, (50, 70))):
    got = v1t_model.crop_resize(jnp.asarray(images[:1]), center_crop=center_crop, out_hw=out_hw)
    expected = grid_sample_crop_then_resize(images[0].transpose(2, 0, 1), center_crop, out_hw)
    np.testing.assert_allclose(got[0], expected.transpose(1, 2, 0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Forward pass.


@pytest.fixture(scope="module")
def reference_model():
  return tiny_model()


# Produced once with this file's tiny_model() / tiny_inputs() (jax 0.10.2, flax 0.12.8, CPU,
# threefry keys) by printing the two predictions below (float32 matmul precision). They pin
# init order, layouts and maths: a change here means the model's numbers changed.
GOLDEN_EVAL_MOUSE0_TRIAL0 = [0.6533743, 0.6156061, 1.1586458]
GOLDEN_EVAL_MOUSE1_TRIAL2 = [0.7590753, 1.1049393, 0.8256504, 0.9433693, 0.7666794]
# key(7): sum over mice, trials and real neurons. Regenerated in session 13: the model now splits
# its key once per pass (one key per random draw), so the dropout masks changed (was 18.755611).
GOLDEN_TRAIN_SUM = 19.00349


def test_golden_forward_values(reference_model):
  inputs = tiny_inputs()
  pred = reference_pred(reference_model, inputs)
  train = np.asarray(forward(reference_model, inputs, jax.random.key(7), True))
  np.testing.assert_allclose(pred[0, 0, :3], GOLDEN_EVAL_MOUSE0_TRIAL0, rtol=1e-5)
  np.testing.assert_allclose(pred[1, 2], GOLDEN_EVAL_MOUSE1_TRIAL2, rtol=1e-5)
  np.testing.assert_allclose(train.sum(where=reference_model.neuron_mask[:, None, :]),
                             GOLDEN_TRAIN_SUM, rtol=1e-5)


def test_state_is_strongly_typed_float32(reference_model):
  """Weakly typed init leaves would come back strong from a train step and force a recompile."""
  for path, var in nnx.to_flat_state(nnx.state(reference_model)):
    value = var.get_value()
    assert value.dtype == jnp.float32 and not value.weak_type, path


def test_forward_outputs_and_randomness(reference_model):
  inputs = tiny_inputs()
  pred, aux = forward(reference_model, inputs, None, False, True)
  assert pred.shape == (2, 3, 5) and np.all(pred > 0)
  np.testing.assert_allclose(pred, jax.nn.elu(aux["pre_activation"]) + 1, rtol=1e-6)
  assert aux["shift"].shape == (2, 3, 2)
  assert aux["attention"].shape == (2, 3, 2, 2, 13, 13)  # [M, B, L, H, T, T]
  np.testing.assert_allclose(aux["attention"].sum(-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="key"):
    reference_model(*inputs, train=True)
  train1 = forward(reference_model, inputs, jax.random.key(1), True)
  train2 = forward(reference_model, inputs, jax.random.key(1), True)
  train3 = forward(reference_model, inputs, jax.random.key(2), True)
  np.testing.assert_array_equal(train1, train2)
  assert not np.allclose(train1, train3)


def test_behavior_modes_route_behavior():
  image, behavior, pupil = tiny_inputs()
  modes = {mode: tiny_model(behavior_mode=mode) for mode in range(5)}
  assert all(block.bmlp is None for mode in (0, 1) for block in modes[mode].core.blocks)
  # B-MLP inputs: behaviour alone (mode 2), behaviour ++ pupil centre (modes 3, 4).
  np.testing.assert_array_equal(modes[2].behavior_features(behavior, pupil), behavior)
  for mode in (3, 4):
    np.testing.assert_array_equal(modes[mode].behavior_features(behavior, pupil),
                                  np.concatenate([behavior, pupil], -1))
  assert modes[3].core.blocks[0].bmlp.fc1.kernel.shape == (5, 4)
  assert modes[4].core.blocks[1].bmlp.fc1.kernel.shape == (2, 5, 4)  # one per mouse
  # Mode 1: the behaviour values tiled as 3 extra channels, so the core sees 1 + 3 channels.
  tiled = np.asarray(v1t_model.tile_behavior(image, behavior))
  np.testing.assert_array_equal(tiled[..., :1], image)
  np.testing.assert_array_equal(tiled[1, 2, 5, 7, 1:], behavior[1, 2])
  assert modes[1].core.patch_embedding.projection.kernel.shape == (4 * 4 * 4, 8)
  moved = forward(modes[1], (image, behavior + 1.0, pupil), None, False)
  assert not np.allclose(forward(modes[1], (image, behavior, pupil), None, False), moved)
  assert tiny_model(shift_mode=0).shifters is None


def accelerated(reference, **paths):
  """A model with other compute paths and the reference model's parameters."""
  model = tiny_model(**paths)
  nnx.update(model, nnx.state(reference))
  assert dataclasses.replace(reference.config, **paths) == model.config
  return model


def test_fused_attention_matches_reference(reference_model):
  inputs = tiny_inputs()
  fused = accelerated(reference_model, attention="fused")
  np.testing.assert_allclose(forward(fused, inputs, None, False),
                             reference_pred(reference_model, inputs), rtol=1e-5)


def test_bfloat16_path_within_tolerance_of_float32(reference_model):
  """bf16 operands (8 significant bits) with f32 accumulation: pred within 1e-2 of f32."""
  inputs = tiny_inputs()
  expected = reference_pred(reference_model, inputs)
  for paths in ({"compute_dtype": "bfloat16"},
                {"compute_dtype": "bfloat16", "attention": "fused"}):
    model = accelerated(reference_model, **paths)
    got = np.asarray(forward(model, inputs, None, False))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-2)
    assert not np.array_equal(got, expected)  # the bf16 path really ran
