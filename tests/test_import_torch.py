"""Importing the original's PyTorch state_dicts (model_spec.md §10), checked against the spec.

The state_dicts here are built by hand from the key list of §10 (exact names and shapes, both
namings), and `numpy_forward` evaluates the spec's formulas (§1, §3-§6) directly on them, so a
wrong transpose, head split, mouse index or padding shows up as a different prediction.
"""

import importlib.util
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from v1t_jax import dataset_meta, import_torch
from v1t_jax.import_torch import CheckpointMismatch
from v1t_jax.model import V1T, ModelConfig

IMAGE_HW = (12, 16)          # unit tests: 4x4 patches at stride 2 -> a 5x7 grid, 36 tokens
COUNTS = (5, 3)              # neurons per mouse; mouse 1 is padded to 5
TINY = dict(emb_dim=8, num_heads=2, num_blocks=2, mlp_dim=12, patch_size=4, patch_stride=2)


# ---------------------------------------------------------------------------------------------
# The spec, in NumPy.


def spec_source_grid(xyz, dim):
  """§4: first `dim` columns, minus column means, over the single largest |value|."""
  xy = xyz[:, :dim] - xyz[:, :dim].mean(0)
  return (xy / np.abs(xy).max()).astype(np.float32)


def make_state_dict(cfg, ids, counts, coords, channels, image_hw=IMAGE_HW, seed=0,
                    shifter_scale=0.8):
  """A state_dict with every key and shape of §10 (HEAD naming), random weights.

  The default shifter weights push some neurons off the feature map (zero padding in use).
  """
  rng = np.random.default_rng(seed)
  d, h, m, p = cfg.emb_dim, cfg.num_heads, cfg.mlp_dim, cfg.patch_size
  rows, cols = ((n - p) // cfg.patch_stride + 1 for n in image_hw)
  tokens = rows * cols + 1

  def w(*shape, scale=0.4):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  def scalar(x):
    return np.asarray(x, np.float32)

  gy, gx = np.meshgrid(np.linspace(-1, 1, image_hw[0]), np.linspace(-1, 1, image_hw[1]),
                       indexing="ij")
  sd = {"image_cropper.grid": np.stack([gx, gy], -1)[None].astype(np.float32),
        "core.reg_scale": scalar(cfg.core_reg_scale),
        "core.patch_embedding.cls_token": w(1, 1, d),
        "core.patch_embedding.pos_embedding": w(tokens, d)}
  if cfg.patch_mode == 0:
    sd["core.patch_embedding.projection.2.weight"] = w(d, channels * p * p)
    sd["core.patch_embedding.projection.2.bias"] = w(d)
  else:
    sd["core.patch_embedding.projection.0.weight"] = w(d, channels, p, p)
    sd["core.patch_embedding.projection.0.bias"] = w(d)
  bias = not cfg.disable_bias
  for i in range(cfg.num_blocks):
    b = f"core.transformer.blocks.{i}"
    if cfg.use_lsa:
      sd[f"{b}.mha.scale"] = (d ** -0.5 * (1 + rng.random(h))).astype(np.float32)
      sd[f"{b}.mha.mask"] = np.zeros((tokens, 2), np.int64)
      sd[f"{b}.mha.max_value"] = scalar(np.finfo(np.float32).max)
    else:
      sd[f"{b}.mha.scale"] = scalar(d ** -0.5)
    sd[f"{b}.mha.layer_norm.weight"] = 1 + w(d, scale=0.2)
    sd[f"{b}.mha.layer_norm.bias"] = w(d, scale=0.2)
    sd[f"{b}.mha.to_qkv.weight"] = w(3 * h * d, d)
    sd[f"{b}.mha.projection.0.weight"] = w(d, h * d, scale=0.2)
    sd[f"{b}.mlp.model.0.weight"] = 1 + w(d, scale=0.2)
    sd[f"{b}.mlp.model.0.bias"] = w(d, scale=0.2)
    sd[f"{b}.mlp.model.1.weight"] = w(m, d)
    sd[f"{b}.mlp.model.4.weight"] = w(d, m, scale=0.2)
    if bias:
      sd[f"{b}.mha.projection.0.bias"] = w(d)
      sd[f"{b}.mlp.model.1.bias"] = w(m)
      sd[f"{b}.mlp.model.4.bias"] = w(d)
    if cfg.behavior_mode >= 2:
      d_b = 3 if cfg.behavior_mode == 2 else 5
      for k in (ids if cfg.behavior_mode == 4 else ["share"]):
        sd[f"{b}.b-mlp.models.{k}.0.weight"] = w(d // 2, d_b)
        sd[f"{b}.b-mlp.models.{k}.3.weight"] = w(d, d // 2)
        if bias:
          sd[f"{b}.b-mlp.models.{k}.0.bias"] = w(d // 2)
          sd[f"{b}.b-mlp.models.{k}.3.bias"] = w(d)
  sd["core.transformer.drop_path.keep_prop"] = scalar(1 - cfg.drop_path)
  for k, n, xyz in zip(ids, counts, coords):
    if cfg.shift_mode == 2:
      sd[f"core_shifter.{k}.reg_scale"] = scalar(cfg.shifter_reg_scale)
      for index, shape in (("0", (5, 2)), ("2", (5, 5)), ("4", (2, 5))):
        sd[f"core_shifter.{k}.mlp.{index}.weight"] = w(*shape, scale=shifter_scale)
        sd[f"core_shifter.{k}.mlp.{index}.bias"] = w(shape[0], scale=shifter_scale)
    r = f"readouts.{k}"
    sd[f"{r}.sigma"] = w(1, n, 2, 2)
    sd[f"{r}.features"] = w(1, d, 1, n)
    sd[f"{r}.bias"] = w(n)
    sd[f"{r}.reg_scale"] = scalar(cfg.readout_reg_scale)
    if cfg.disable_grid_predictor:
      sd[f"{r}._mu"] = w(1, n, 1, 2)
    else:
      dim = cfg.grid_predictor_dim
      sd[f"{r}.source_grid"] = spec_source_grid(xyz[:n], dim)
      sd[f"{r}.mu_transform.0.weight"] = w(30, dim, scale=1.0)
      sd[f"{r}.mu_transform.0.bias"] = w(30)
      sd[f"{r}.mu_transform.2.weight"] = w(2, 30)
      sd[f"{r}.mu_transform.2.bias"] = w(2)
  sd["elu1.one"] = scalar(1.0)
  return sd


def to_old_naming(sd, id_map):
  """§10's older naming: `b-mlp.model` without `share`, and the old mouse ids."""
  out = {}
  for key, value in sd.items():
    key = key.replace(".b-mlp.models.share.", ".b-mlp.model.").replace(".b-mlp.models.",
                                                                         ".b-mlp.model.")
    parts = key.split(".")
    if parts[0] in ("readouts", "core_shifter"):
      parts[1] = id_map[parts[1]]
    if "b-mlp" in parts and parts[parts.index("b-mlp") + 2] in id_map:
      parts[parts.index("b-mlp") + 2] = id_map[parts[parts.index("b-mlp") + 2]]
    out[".".join(parts)] = value
  return out


def layer_norm(x, weight, bias):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * weight + bias


def linear(sd, key, x):
  y = x @ sd[f"{key}.weight"].astype(np.float64).T
  return y + sd[f"{key}.bias"] if f"{key}.bias" in sd else y


def gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def elu(x):
  return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def find_shape(n):
  h = math.ceil(math.sqrt(n))
  while n % h:
    h -= 1
  return h, n // h


def grid_sample(feat_BxCxHxW, grid_BxNx2):
  """F.grid_sample(bilinear, zeros, align_corners=True) -> (B, C, N)."""
  b, _, height, width = feat_BxCxHxW.shape
  ix = (grid_BxNx2[..., 0] + 1) / 2 * (width - 1)
  iy = (grid_BxNx2[..., 1] + 1) / 2 * (height - 1)
  out = 0.0
  for x in (np.floor(ix), np.floor(ix) + 1):
    for y in (np.floor(iy), np.floor(iy) + 1):
      weight = (1 - np.abs(ix - x)) * (1 - np.abs(iy - y))
      inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
      xi = np.clip(x, 0, width - 1).astype(int)
      yi = np.clip(y, 0, height - 1).astype(int)
      values = feat_BxCxHxW[np.arange(b)[:, None], :, yi, xi]     # (B, N, C)
      out = out + values * (weight * inside)[..., None]
  return out.transpose(0, 2, 1)


def numpy_forward(sd, cfg, mouse, image_BxCxHxW, behavior_Bx3, pupil_Bx2):
  """ELU(readout) + 1 of one mouse in eval mode, straight from the spec's formulas."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  d, heads, p, s = cfg.emb_dim, cfg.num_heads, cfg.patch_size, cfg.patch_stride
  x = np.asarray(image_BxCxHxW, np.float64)
  batch = x.shape[0]
  if cfg.behavior_mode == 1:   # behaviour tiled as extra channels after the resize
    tiles = np.broadcast_to(behavior_Bx3[:, :, None, None], (batch, 3) + x.shape[2:])
    x = np.concatenate([x, tiles], axis=1)
  rows, cols = ((n - p) // s + 1 for n in x.shape[2:])
  # Unfold: channel-major patch vectors, tokens row-major.
  patches = np.stack([x[:, :, i * s:i * s + p, j * s:j * s + p].reshape(batch, -1)
                      for i in range(rows) for j in range(cols)], axis=1)
  e = "core.patch_embedding"
  if cfg.patch_mode == 0:
    t = linear(sd, f"{e}.projection.2", patches)
  else:   # Conv2d = cross-correlation with the (D, C, P, P) weight
    t = patches @ sd[f"{e}.projection.0.weight"].reshape(d, -1).T + sd[f"{e}.projection.0.bias"]
  cls = np.broadcast_to(sd[f"{e}.cls_token"], (batch, 1, d))
  t = np.concatenate([cls, t], axis=1) + sd[f"{e}.pos_embedding"]
  b = behavior_Bx3 if cfg.behavior_mode == 2 else np.concatenate([behavior_Bx3, pupil_Bx2], -1)
  for i in range(cfg.num_blocks):
    k = f"core.transformer.blocks.{i}"
    if cfg.behavior_mode >= 2:
      bm = f"{k}.b-mlp.models.{mouse if cfg.behavior_mode == 4 else 'share'}"
      t = t + np.tanh(linear(sd, f"{bm}.3", np.tanh(linear(sd, f"{bm}.0", b))))[:, None]
    u = layer_norm(t, sd[f"{k}.mha.layer_norm.weight"], sd[f"{k}.mha.layer_norm.bias"])
    qkv = u @ sd[f"{k}.mha.to_qkv.weight"].T
    q, kk, v = (a.reshape(batch, -1, heads, d).transpose(0, 2, 1, 3)
                for a in np.split(qkv, 3, axis=-1))
    scale = sd[f"{k}.mha.scale"]
    logits = q @ kk.transpose(0, 1, 3, 2) * (scale[:, None, None] if cfg.use_lsa else scale)
    if cfg.use_lsa:
      logits = np.where(np.eye(logits.shape[-1], dtype=bool), -np.finfo(np.float32).max, logits)
    o = (softmax(logits) @ v).transpose(0, 2, 1, 3).reshape(batch, -1, heads * d)
    t = t + linear(sd, f"{k}.mha.projection.0", o)
    u = layer_norm(t, sd[f"{k}.mlp.model.0.weight"], sd[f"{k}.mlp.model.0.bias"])
    t = t + linear(sd, f"{k}.mlp.model.4", gelu(linear(sd, f"{k}.mlp.model.1", u)))
  h, w = find_shape(rows * cols)
  feat = t[:, 1:].reshape(batch, h, w, d).transpose(0, 3, 1, 2)
  r = f"readouts.{mouse}"
  if cfg.disable_grid_predictor:
    mu = sd[f"{r}._mu"][0, :, 0, :]
  else:
    mu = np.tanh(linear(sd, f"{r}.mu_transform.2",
                        elu(linear(sd, f"{r}.mu_transform.0", sd[f"{r}.source_grid"]))))
  grid = np.broadcast_to(np.clip(mu, -1, 1), (batch,) + mu.shape)
  if cfg.shift_mode == 2:
    c = f"core_shifter.{mouse}.mlp"
    shift = np.tanh(linear(sd, f"{c}.4", np.tanh(linear(sd, f"{c}.2", np.tanh(
        linear(sd, f"{c}.0", pupil_Bx2))))))
    grid = grid + shift[:, None, :]
  samples = grid_sample(feat, grid)                                     # (B, C, N)
  y = np.einsum("cn,bcn->bn", sd[f"{r}.features"][0, :, 0, :], samples) + sd[f"{r}.bias"]
  return elu(y) + 1


# ---------------------------------------------------------------------------------------------
# Unit tests on hand-built state_dicts (no data, no torch).


def build(cfg, seed=1):
  coords = np.random.default_rng(seed).uniform(-300, 300, (len(COUNTS), max(COUNTS), 3))
  model = V1T(cfg, neuron_counts=COUNTS, coordinates=coords, image_shape=IMAGE_HW + (1,),
              rngs=nnx.Rngs(seed))
  return model, coords


def inputs(seed=2, batch=3):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((len(COUNTS), batch) + IMAGE_HW + (1,)).astype(np.float32),
          rng.standard_normal((len(COUNTS), batch, 3)).astype(np.float32),
          rng.standard_normal((len(COUNTS), batch, 2)).astype(np.float32))


VARIANTS = {
    "mode3_head": (dict(behavior_mode=3), False),
    "mode3_old": (dict(behavior_mode=3), True),
    "mode4_old": (dict(behavior_mode=4), True),
    "mode2_conv_nobias_lsa_freemu_noshift": (
        dict(behavior_mode=2, patch_mode=1, disable_bias=True, use_lsa=True,
             disable_grid_predictor=True, shift_mode=0), False),
    "mode1_grid3": (dict(behavior_mode=1, grid_predictor_dim=3), True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_imported_model_equals_the_spec_forward_pass(variant):
  overrides, old = VARIANTS[variant]
  cfg = ModelConfig(**TINY, **overrides)
  model, coords = build(cfg)
  ids = ["S1", "A"]
  channels = 4 if cfg.behavior_mode == 1 else 1
  sd = make_state_dict(cfg, ids, COUNTS, coords, channels)
  loaded = to_old_naming(sd, {"S1": "1", "A": "2"}) if old else sd
  report = import_torch.import_state_dict(model, loaded)
  assert report["naming"] == ("old" if old else "head")
  assert report["mouse_ids"] == (["1", "2"] if old else ids)
  assert "core.reg_scale" in report["buffers_ignored"]

  images, behavior, pupil = inputs()
  forward = nnx.jit(lambda model, *x: model(*x, train=False)[0])   # one compile, not op by op
  pred = np.asarray(forward(model, jnp.asarray(images), jnp.asarray(behavior), jnp.asarray(pupil)))
  for m, (mouse, n) in enumerate(zip(ids, COUNTS)):
    want = numpy_forward(sd, cfg, mouse, images[m].transpose(0, 3, 1, 2), behavior[m], pupil[m])
    np.testing.assert_allclose(pred[m, :, :n], want, rtol=2e-5, atol=2e-5, err_msg=mouse)
    assert np.ptp(want) > 0.1   # not a degenerate comparison


def test_parameters_land_where_the_spec_says():
  cfg = ModelConfig(**TINY, behavior_mode=4)
  model, coords = build(cfg)
  sd = make_state_dict(cfg, ["S1", "A"], COUNTS, coords, 1)
  import_torch.import_state_dict(model, sd)
  block = model.core.blocks[1]
  np.testing.assert_array_equal(block.mha.to_qkv.kernel[...],
                                sd["core.transformer.blocks.1.mha.to_qkv.weight"].T)
  np.testing.assert_array_equal(block.bmlp.fc2.kernel[...][1],   # mouse axis: A is mouse 1
                                sd["core.transformer.blocks.1.b-mlp.models.A.3.weight"].T)
  np.testing.assert_array_equal(block.mlp.layer_norm.scale[...],
                                sd["core.transformer.blocks.1.mlp.model.0.weight"])
  np.testing.assert_array_equal(model.shifters.fc3.bias[...][0], sd["core_shifter.S1.mlp.4.bias"])
  features = np.asarray(model.readouts.features[...])
  np.testing.assert_array_equal(features[1, :3], sd["readouts.A.features"][0, :, 0, :].T)
  assert not features[1, 3:].any() and not np.asarray(model.readouts.bias[...])[1, 3:].any()
  np.testing.assert_array_equal(model.readouts.source_grid[...][0], sd["readouts.S1.source_grid"])
  np.testing.assert_array_equal(model.readouts.sigma[...][1, :3], sd["readouts.A.sigma"][0])


@pytest.mark.parametrize("old", [False, True])
def test_export_round_trip(old):
  cfg = ModelConfig(**TINY, behavior_mode=4, readout_reg_scale=0.01, shifter_reg_scale=0.2)
  model, coords = build(cfg)
  sd = make_state_dict(cfg, ["S1", "A"], COUNTS, coords, 1)
  ids = ["S1", "A"]
  if old:
    sd, ids = to_old_naming(sd, {"S1": "1", "A": "2"}), ["1", "2"]
  import_torch.import_state_dict(model, sd)
  back = import_torch.export_state_dict(model, ids, old_naming=old, raw_image_hw=IMAGE_HW)
  assert sorted(back) == sorted(sd)
  for key in sd:
    np.testing.assert_allclose(back[key], sd[key], rtol=1e-6, err_msg=key)
    assert back[key].shape == sd[key].shape, key


def test_stacked2d_checkpoint_round_trip():
  """A CNN-core run: its state_dict (core keys as stacked2d.torch_keys, which test_stacked2d.py
  checks against the original's module tree; BatchNorm running statistics included) loads into
  a fresh model, which then predicts what the exported one did."""
  cfg = ModelConfig(core="stacked2d", behavior_mode=1,
                    stacked2d={"num_layers": 2, "hidden_channels": 4, "input_kern": 3,
                               "hidden_kern": 3})
  source, _ = build(cfg, seed=1)
  rng = np.random.default_rng(0)
  for layer in source.core.layers:   # running statistics away from their initial values
    layer.norm.mean[...] = rng.normal(size=4).astype(np.float32)
    layer.norm.var[...] = rng.uniform(0.5, 2.0, size=4).astype(np.float32)
  sd = import_torch.export_state_dict(source, ["S1", "A"])
  assert "core.features.layer1.ds_conv.spatial_conv.weight" in sd
  assert sd["core.features.layer0.norm.running_var"].shape == (4,)
  assert sd["core.gamma_input"] == np.float32(6.3831)
  target, _ = build(cfg, seed=2)   # other parameters and coordinates
  report = import_torch.import_state_dict(target, sd, check_source_grid=False)
  assert "core.gamma_input" in report["buffers_ignored"]
  images, behavior, pupil = (jnp.asarray(x) for x in inputs())
  want, _ = source(images, behavior, pupil, train=False)
  got, _ = target(images, behavior, pupil, train=False)
  for m, n in enumerate(COUNTS):   # real neurons (padded rows are arbitrary)
    np.testing.assert_allclose(got[m, :, :n], want[m, :, :n], rtol=1e-6, atol=1e-6)
  args = {"core": "stacked2d", "behavior_mode": 1, "num_layers": 3, "core_reg_input": 2.0,
          "dropout": 0.1}
  overrides = import_torch.config_overrides(args, data_dir="d", mice=["S1"])
  assert overrides["model.core"] == "stacked2d"
  assert overrides["model.stacked2d.num_layers"] == 3
  assert overrides["model.stacked2d.dropout"] == 0.1
  ModelConfig.from_config(import_torch.config_from_overrides(overrides).model)


def test_broken_checkpoints_list_every_offender():
  cfg = ModelConfig(**TINY, behavior_mode=3)
  model, coords = build(cfg)
  sd = make_state_dict(cfg, ["S1", "A"], COUNTS, coords, 1)
  broken = dict(sd)
  del broken["core.transformer.blocks.1.mlp.model.4.bias"], broken["readouts.A.sigma"]
  broken["core.transformer.blocks.0.mha.extra"] = np.zeros(3, np.float32)
  broken["image_cropper.image_shifter.S1.mlp.0.weight"] = np.zeros((10, 2), np.float32)
  broken["core.patch_embedding.pos_embedding"] = np.zeros((37, 8), np.float32)
  broken["readouts.A.features"] = np.zeros((1, 8, 1, 4), np.float32)
  broken["core.transformer.blocks.0.mha.scale"] = np.float32(0.5)
  with pytest.raises(CheckpointMismatch) as error:
    import_torch.import_state_dict(model, broken)
  message = str(error.value)
  for expected in ("missing keys (2)", "core.transformer.blocks.1.mlp.model.4.bias",
                   "readouts.A.sigma", "unexpected keys (2)", "blocks.0.mha.extra",
                   "shift_mode 1/3/4, which is not ported",
                   "core.patch_embedding.pos_embedding: shape (37, 8), expected (36, 8)",
                   "readouts.A.features: shape (1, 8, 1, 4), expected (1, 8, 1, 3) (the data has 3",
                   "core.transformer.blocks.0.mha.scale: 0.5, but args.yaml gives 0.353553"):
    assert expected in message, (expected, message)

  # Neurons in another order than the data's: the stored source grid gives it away.
  shuffled = dict(sd, **{"readouts.S1.source_grid": sd["readouts.S1.source_grid"][::-1].copy()})
  with pytest.raises(CheckpointMismatch, match="readouts.S1.source_grid: differs by up to"):
    import_torch.import_state_dict(model, shuffled)


def test_mouse_ids_both_namings():
  assert [import_torch.mouse_name(i) for i in ("0", "1", "6", "S1", "B", "static25311-10-26",
                                               "90001-1-1")] == [
      "S0", "S1", "E", "S1", "B", "F", "90001-1-1"]
  assert [import_torch.old_mouse_id(n) for n in ("S1", "E", "F")] == ["1", "6",
                                                                        "static25311-10-26"]
  available = ["27204-5-13", "21067-10-18", "90001-1-1"]   # data keys of S1, A and a synthetic
  assert import_torch.match_mice(["1", "A", "static90001-1-1"], available) == [
      "S1", "A", "90001-1-1"]
  with pytest.raises(CheckpointMismatch, match=r"'Z', '4' \(= C\)") as error:
    import_torch.match_mice(["S1", "Z", "4"], available)
  assert "'S1'" not in str(error.value).split("(available")[0]


def test_args_yaml_to_config(tmp_path):
  text = """\
dataset: data/sensorium
output_dir: runs/v1t
core: vit
readout: gaussian2d
behavior_mode: 4
shift_mode: 2
emb_dim: 16
use_lsa: false
ds_scale: 1
resize_image: 1
limit_data: null
core_lr: null
lr: 0.001647
batch_size: 16
mouse_ids: null
device: cuda
input_shape: !!python/tuple [1, 36, 64]
"""
  path = tmp_path / "args.yaml"
  path.write_text(text)
  args = import_torch.read_args_yaml(str(path))
  assert args["input_shape"] == [1, 36, 64]
  overrides = import_torch.config_overrides(args, data_dir="d", mice=["S1", "A"])
  config = import_torch.config_from_overrides(overrides)
  assert config.model.behavior_mode == 4 and config.model.emb_dim == 16
  assert config.model.ds_scale is True and config.data.resize_image is True
  assert config.data.batch_size == 16 and config.data.mice == ("S1", "A")
  assert config.data.data_dir == os.path.abspath("d")
  ModelConfig.from_config(config.model)   # a valid model config
  with pytest.raises(ValueError, match="--core 'stn' is not importable \\(--core vit or stacked2d"):
    import_torch.config_overrides(dict(args, core="stn"), data_dir="d", mice=["S1"])
  with pytest.raises(ValueError, match="image shifter"):
    ModelConfig.from_config(import_torch.config_from_overrides(import_torch.config_overrides(
        dict(args, shift_mode=3), data_dir="d", mice=["S1"])).model)


def test_torch_file_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  sd = {"readouts.A.bias": np.arange(3, dtype=np.float32),
        "core.patch_embedding.cls_token": np.ones((1, 1, 4), np.float32)}
  path = str(tmp_path / "model_state.pt")
  import_torch.save_state_dict_file(sd, path, info={"epoch": 7, "value": 0.25})
  loaded, info = import_torch.load_state_dict_file(path)
  assert info == {"epoch": 7, "value": 0.25}
  assert sorted(loaded) == sorted(sd)
  for key in sd:
    np.testing.assert_array_equal(loaded[key], sd[key])
  # A bare state_dict of a torch.compile'd module, in half precision.
  bare = {"_orig_mod." + k: torch.from_numpy(v).half() for k, v in sd.items()}
  torch.save(bare, path)
  loaded, info = import_torch.load_state_dict_file(path)
  assert info == {} and loaded["readouts.A.bias"].dtype == np.float32
  np.testing.assert_array_equal(loaded["readouts.A.bias"], sd["readouts.A.bias"])


def original_scheduler_state(torch, monkeypatch):
  """What the original's Scheduler.state_dict() pickles (src/v1t/utils/scheduler.py): its
  GradScaler (as an enabled CUDA scaler pickles it), args.device and NumPy scalars."""
  import collections
  import sys
  import types
  import warnings
  try:
    from torch.cuda.amp.grad_scaler import GradScaler
  except ImportError:   # gone from this torch: a stand-in of the same class path
    GradScaler = type("GradScaler", (), {"__module__": "torch.cuda.amp.grad_scaler"})
    module = sys.modules.get("torch.cuda.amp.grad_scaler") or types.ModuleType(
        "torch.cuda.amp.grad_scaler")
    monkeypatch.setitem(sys.modules, "torch.cuda.amp.grad_scaler", module)
    monkeypatch.setattr(module, "GradScaler", GradScaler, raising=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # deprecated / CUDA not available
    scaler = GradScaler.__new__(GradScaler)
  refresh = dict   # the defaultdict's factory: a function of torch.amp (torch.cuda.amp < 2.3)
  for module in ("torch.amp.grad_scaler", "torch.cuda.amp.grad_scaler"):
    try:
      refresh = importlib.import_module(module)._refresh_per_optimizer_state
      break
    except (ImportError, AttributeError):
      pass
  scaler.__dict__.update(
      _device="cuda", _enabled=True, _init_scale=65536.0, _scale=None, _growth_factor=2.0,
      _backoff_factor=0.5, _growth_interval=2000, _init_growth_tracker=0, _growth_tracker=None,
      _per_optimizer_states=collections.defaultdict(refresh))
  return {"mode": "max", "scaler": scaler, "module_names": None, "max_reduce": 2,
          "num_reduce": 0, "lr_patience": 10, "lr_wait": 3, "factor": 0.3, "min_epochs": 0,
          "best_value": np.float32(0.31), "best_epoch": np.int64(12),
          "device": torch.device("cuda"),
          "checkpoint_dir": "runs/v1t/ckpt", "save_optimizer": True, "save_scheduler": True,
          "verbose": 1, "extra": [np.float64(0.5), np.dtype("float32")]}


class NotAllowed:
  pass


def test_original_checkpoint_loads_without_trust_pickle(tiny_data_dir, tmp_path, monkeypatch):
  """The original's model_state.pt (weights + scheduler state) imports without --trust_pickle,
  through the command's own path; any other pickled object is still refused."""
  torch = pytest.importorskip("torch")
  if not hasattr(torch.serialization, "add_safe_globals"):
    pytest.skip("allow-listing pickled types needs torch >= 2.4")
  mice = dataset_meta.resolve_mice(tiny_data_dir)
  names = [m.name for m in mice]
  cfg = ModelConfig(emb_dim=8, num_heads=2, num_blocks=1, mlp_dim=12, patch_size=6,
                    patch_stride=6, behavior_mode=4)
  sd = make_state_dict(cfg, names, [m.num_neurons for m in mice],
                       [m.coordinates for m in mice], 1, image_hw=(36, 64), seed=3)
  ckpt = {"epoch": 12, "value": 0.31, "model": {k: torch.from_numpy(v) for k, v in sd.items()},
          "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "name": "core"}]},
          "scheduler": original_scheduler_state(torch, monkeypatch)}
  path = str(tmp_path / "model_state.pt")
  torch.save(ckpt, path)
  args = {"core": "vit", "readout": "gaussian2d", "behavior_mode": 4, "shift_mode": 2,
          "emb_dim": 8, "num_heads": 2, "num_blocks": 1, "mlp_dim": 12, "patch_size": 6,
          "patch_stride": 6, "batch_size": 4, "mouse_ids": None, "device": "cuda", "seed": 42}
  (tmp_path / "args.yaml").write_text(yaml.safe_dump(args))
  report = import_torch.import_checkpoint(path, str(tmp_path / "args.yaml"), tiny_data_dir,
                                          str(tmp_path / "imported"))
  assert report["mice"] == names and report["naming"] == "head" and report["keys_loaded"]
  assert os.path.exists(report["config"])

  # Anything else pickled beside the weights: refused, naming the type.
  ckpt["scheduler"]["extra"] = NotAllowed()
  torch.save(ckpt, path)
  with pytest.raises(ValueError, match=r"NotAllowed.*--trust_pickle"):
    import_torch.load_state_dict_file(path)
  loaded, info = import_torch.load_state_dict_file(path, trust_pickle=True)
  assert info == {"epoch": 12, "value": 0.31} and sorted(loaded) == sorted(sd)


def test_names_pickled_by_older_torch_load(tmp_path, monkeypatch):
  """torch < 2.3 pickled the scaler's defaultdict factory as torch.cuda.amp.grad_scaler.*."""
  import collections
  torch = pytest.importorskip("torch")
  if import_torch._torch_version(torch) < (2, 6):
    pytest.skip("allow-listing a global under another name needs torch >= 2.6")
  new_module = importlib.import_module("torch.amp.grad_scaler")
  old_module = importlib.import_module("torch.cuda.amp.grad_scaler")
  refresh = new_module._refresh_per_optimizer_state
  with monkeypatch.context() as m:   # pickle it under the old name
    m.setattr(refresh, "__module__", "torch.cuda.amp.grad_scaler")
    m.setattr(old_module, "_refresh_per_optimizer_state", refresh, raising=False)
    path = str(tmp_path / "model_state.pt")
    torch.save({"model": {"core.reg_scale": torch.zeros(())},
                "scheduler": {"states": collections.defaultdict(refresh)}}, path)
  loaded, _ = import_torch.load_state_dict_file(path)
  assert list(loaded) == ["core.reg_scale"]


# ---------------------------------------------------------------------------------------------
# The command end to end on the tiny synthetic data: import, then the project's evaluate path.


def correlation(pred_TxN, target_TxN):
  zx = (pred_TxN - pred_TxN.mean(0)) / (pred_TxN.std(0) + 1e-8)
  zy = (target_TxN - target_TxN.mean(0)) / (target_TxN.std(0) + 1e-8)
  return (zx * zy).mean(0).mean()


def test_cli_import_then_evaluate(tiny_data_dir, tmp_path):
  from v1t_jax import checkpoints, input_pipeline, train

  mice = dataset_meta.resolve_mice(tiny_data_dir)
  names = [m.name for m in mice]
  counts = [m.num_neurons for m in mice]
  cfg = ModelConfig(emb_dim=16, num_heads=2, num_blocks=2, mlp_dim=32, patch_size=6,
                    patch_stride=6, behavior_mode=4)
  # Small shifts keep every neuron on the map: a neuron sampled off the map has a constant
  # prediction, whose correlation is rounding noise (float32 sums in the project's metric).
  sd = make_state_dict(cfg, names, counts, [m.coordinates for m in mice], 1, image_hw=(36, 64),
                       seed=3, shifter_scale=0.1)
  # Old naming and old-style ids ("static<scan>") through the command.
  old = to_old_naming(sd, {n: "static" + n for n in names})
  np.savez(tmp_path / "model_state.npz", **old)
  args = {"core": "vit", "readout": "gaussian2d", "behavior_mode": 4, "shift_mode": 2,
          "emb_dim": 16, "num_heads": 2, "num_blocks": 2, "mlp_dim": 32, "patch_size": 6,
          "patch_stride": 6, "batch_size": 4, "mouse_ids": None, "device": "cuda", "seed": 42}
  (tmp_path / "args.yaml").write_text(yaml.safe_dump(args))
  workdir = str(tmp_path / "imported")
  report = import_torch.import_checkpoint(str(tmp_path / "model_state.npz"),
                                          str(tmp_path / "args.yaml"), tiny_data_dir, workdir)
  assert report["mice"] == names and report["naming"] == "old"
  assert "device" in report["args_ignored"]
  with pytest.raises(FileExistsError):   # never over a run
    import_torch.import_checkpoint(str(tmp_path / "model_state.npz"),
                                   str(tmp_path / "args.yaml"), tiny_data_dir, workdir)

  # The written config file is what launch_train.py --config= loads.
  spec = importlib.util.spec_from_file_location("imported_config", report["config"])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.model.behavior_mode == 4 and config.seed == 42
  result = train.evaluate_checkpoint(config, workdir)
  assert result["checkpoint_step"] == 0

  # The restored checkpoint predicts what the spec's formulas give on the torch weights.
  trainer = train.setup(config)
  latest, best = checkpoints.checkpoint_managers(workdir)
  state, meta = checkpoints.restore(best, trainer)
  latest.close(), best.close()
  assert meta["run"]["mice"][0]["name"] == names[0] and meta["imported_from"]["checkpoint"]
  ds, _ = input_pipeline.eval_dataset(trainer.mice, "validation", config.data)
  preds, targets = [[] for _ in mice], [[] for _ in mice]
  for batch in input_pipeline.as_numpy(ds):
    got = np.asarray(trainer.eval_step(state["params"], state["buffers"],
                                       trainer.device_batch(batch))["pred"])
    for m, (name, n) in enumerate(zip(names, counts)):
      valid = batch["valid"][m]
      want = numpy_forward(sd, cfg, name, batch["image"][m][valid].transpose(0, 3, 1, 2),
                           batch["behavior"][m][valid], batch["pupil_center"][m][valid])
      np.testing.assert_allclose(got[m][valid][:, :n], want, rtol=1e-4, atol=1e-5)
      preds[m].append(want)
      targets[m].append(batch["responses"][m][valid][:, :n])
  for m, name in enumerate(names):
    np.testing.assert_allclose(
        result["validation"]["single_trial_correlation"][name],
        correlation(np.concatenate(preds[m]), np.concatenate(targets[m])), atol=1e-4)
