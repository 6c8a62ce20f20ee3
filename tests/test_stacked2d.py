"""The stacked2d core against float64 NumPy implementations of the original's layers
(V1T src/v1t/models/core/stacked2d.py), PyTorch's BatchNorm2d and a PyTorch rebuild of the
original's module tree (state_dict keys, parameter count, forward)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v1t_jax import stacked2d
from v1t_jax.stacked2d import Stacked2dConfig, Stacked2dCore

SMALL = {  # name -> (config, image (H, W, C))
    "ds": (Stacked2dConfig(num_layers=3, hidden_channels=4, input_kern=5, hidden_kern=3),
           (12, 16, 1)),
    "plain": (Stacked2dConfig(
        num_layers=3, hidden_channels=3, input_kern=3, hidden_kern=3, depth_separable=False,
        skip=2, stack=None, pad_input=True, hidden_dilation=2, final_nonlinearity=False,
        elu_shift=(0.5, 1.0), core_reg_hidden=0.3, use_avg_reg=True, laplace_padding=0),
        (12, 16, 2)),
    "strided": (Stacked2dConfig(num_layers=2, hidden_channels=4, input_kern=3, hidden_kern=5,
                                stride=2, batch_norm=False, linear=True), (12, 16, 1)),
}
LAPLACE = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float64)


def hidden_kerns(cfg):
  kern = cfg.hidden_kern
  return list(kern) if isinstance(kern, tuple) else [kern] * (cfg.num_layers - 1)


def hidden_pad(cfg):
  """The original sets self.hidden_padding once, from the first hidden kernel."""
  if cfg.hidden_padding is not None:
    return cfg.hidden_padding
  return ((hidden_kerns(cfg)[0] - 1) * cfg.hidden_dilation + 1) // 2


def stacked(cfg):
  """self.stack: range(L) for None, [*range(L)[stack:]] for an int, else as given."""
  if cfg.stack is None:
    return list(range(cfg.num_layers))
  return [*range(cfg.num_layers)[cfg.stack:]] if isinstance(cfg.stack, int) else list(cfg.stack)


def random_torch_params(config, in_ch, seed):
  """Random values for every state_dict entry (torch layout), BN stats non-trivial."""
  rng = np.random.default_rng(seed)
  shapes = torch_shapes(config, in_ch)
  params = {}
  for key, shape in shapes.items():
    if key.endswith("running_var"):
      params[key] = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("norm.weight"):
      params[key] = rng.uniform(0.5, 1.5, shape)
    elif not key.endswith("num_batches_tracked"):
      params[key] = rng.normal(0.0, 0.4, shape)
  return params


def torch_shapes(config, in_ch):
  """Shapes of the original's state_dict, derived from its layer definitions."""
  c, shapes = config.hidden_channels, {}
  for l in range(config.num_layers):
    base = f"core.features.layer{l}"
    if l == 0:
      shapes[f"{base}.conv.weight"] = (c, in_ch, config.input_kern, config.input_kern)
      if config.bias and not config.batch_norm:
        shapes[f"{base}.conv.bias"] = (c,)
    else:
      k, i = hidden_kerns(config)[l - 1], c * (min(config.skip, l) if config.skip > 1 else 1)
      convs = ({"in_depth_conv": (c, i, 1, 1), "spatial_conv": (c, 1, k, k),
                "out_depth_conv": (c, c, 1, 1)} if config.depth_separable
               else {"": (c, i, k, k)})
      for sub, shape in convs.items():
        name = f"{base}.ds_conv.{sub}" if sub else f"{base}.conv"
        shapes[f"{name}.weight"] = shape
        if config.bias:
          shapes[f"{name}.bias"] = (c,)
    if config.batch_norm:
      for stat in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{base}.norm.{stat}"] = (c,)
      shapes[f"{base}.norm.num_batches_tracked"] = ()
  return shapes


def load(core, params, config):
  """Set our core from torch-layout params through torch_keys."""
  flat = dict(nnx.to_flat_state(nnx.state(core)))
  for key, (path, kind) in stacked2d.torch_keys(config).items():
    if kind == "skip":
      continue
    value = params[key].transpose(2, 3, 1, 0) if kind == "conv" else params[key]
    assert flat[path].shape == value.shape, key
    flat[path] = flat[path].replace(jnp.asarray(value, jnp.float32))
  nnx.update(core, nnx.from_flat_state(list(flat.items())))


def np_conv(x_NHWC, w_OIkk, b, pad, stride=1, dilation=1, depthwise=False):
  """PyTorch Conv2d (cross-correlation, symmetric zero padding) by summing over kernel taps."""
  xp = np.pad(x_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w_OIkk.shape[-1]
  ho, wo = ((xp.shape[a] - dilation * (k - 1) - 1) // stride + 1 for a in (1, 2))
  out = np.zeros(x_NHWC.shape[:1] + (ho, wo, w_OIkk.shape[0]))
  for i in range(k):
    for j in range(k):
      win = xp[:, i * dilation:i * dilation + stride * (ho - 1) + 1:stride,
               j * dilation:j * dilation + stride * (wo - 1) + 1:stride]
      out += win * w_OIkk[:, 0, i, j] if depthwise else win @ w_OIkk[:, :, i, j].T
  return out if b is None else out + b


def np_forward(params, config, images, train):
  """The original's forward, mouse by mouse (one core call per mouse), and its running stats."""
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  get = params.get
  mice = images.shape[0]
  cfg, outs = config, []
  x = images.astype(np.float64)  # [M, B, H, W, C]
  for l in range(cfg.num_layers):
    base = f"core.features.layer{l}"
    if l >= 1 and cfg.skip > 1:
      x = np.concatenate(outs[-min(cfg.skip, l):], axis=-1)
    flat = x.reshape((-1,) + x.shape[2:])
    if l == 0:
      pad0 = cfg.input_kern // 2 if cfg.pad_input else 0
      flat = np_conv(flat, params[f"{base}.conv.weight"], get(f"{base}.conv.bias"), pad0)
    elif cfg.depth_separable:
      ds = f"{base}.ds_conv"
      flat = np_conv(flat, params[f"{ds}.in_depth_conv.weight"], get(f"{ds}.in_depth_conv.bias"), 0)
      flat = np_conv(flat, params[f"{ds}.spatial_conv.weight"], get(f"{ds}.spatial_conv.bias"),
                     hidden_pad(cfg), cfg.stride, cfg.hidden_dilation, depthwise=True)
      flat = np_conv(flat, params[f"{ds}.out_depth_conv.weight"],
                     get(f"{ds}.out_depth_conv.bias"), 0)
    else:
      flat = np_conv(flat, params[f"{base}.conv.weight"], get(f"{base}.conv.bias"),
                     hidden_pad(cfg), cfg.stride, cfg.hidden_dilation)
    x = flat.reshape(x.shape[:2] + flat.shape[1:])
    if cfg.batch_norm:
      norm = f"{base}.norm"
      mean, var = params[f"{norm}.running_mean"], params[f"{norm}.running_var"]
      ys = []
      for m in range(mice):
        if train:
          n = x[m].size // x.shape[-1]
          bmean, bvar = x[m].mean(axis=(0, 1, 2)), x[m].var(axis=(0, 1, 2))
          mean = (1 - cfg.momentum) * mean + cfg.momentum * bmean
          var = (1 - cfg.momentum) * var + cfg.momentum * bvar * n / (n - 1)
          ys.append((x[m] - bmean) / np.sqrt(bvar + 1e-5))
        else:
          ys.append((x[m] - mean) / np.sqrt(var + 1e-5))
      params[f"{norm}.running_mean"], params[f"{norm}.running_var"] = mean, var
      x = np.stack(ys) * params[f"{norm}.weight"] + params[f"{norm}.bias"]
    if not cfg.linear and (l < cfg.num_layers - 1 or cfg.final_nonlinearity):
      z = x - cfg.elu_shift[0]
      x = np.where(z > 0, z, np.expm1(np.minimum(z, 0))) + cfg.elu_shift[1]
    outs.append(x)
  return np.concatenate([outs[l] for l in stacked(cfg)], axis=-1), params


def build(name, seed=0, compute_dtype="float32"):
  config, image_shape = SMALL[name]
  core = Stacked2dCore(config, image_shape, compute_dtype=compute_dtype, rngs=nnx.Rngs(seed))
  params = random_torch_params(config, image_shape[-1], seed + 1)
  load(core, params, config)
  images = np.random.default_rng(seed + 2).normal(size=(2, 3, *image_shape)).astype(np.float32)
  return config, core, params, images


def stats(core):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(core, nnx.BatchStat))}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_eval_and_train_match_numpy(name):
  config, core, params, images = build(name)
  want_eval, _ = np_forward(params, config, images, train=False)
  got_eval, aux = core(jnp.asarray(images), train=False)
  assert aux == {} and got_eval.dtype == jnp.float32
  assert got_eval.shape == (2, 3, *core.output_shape) == want_eval.shape
  np.testing.assert_allclose(got_eval, want_eval, rtol=1e-4, atol=1e-4)
  before = stats(core)
  want_train, new_params = np_forward(params, config, images, train=True)
  got_train, _ = core(jnp.asarray(images), train=True)
  np.testing.assert_allclose(got_train, want_train, rtol=1e-4, atol=1e-4)
  for key, (path, _) in stacked2d.torch_keys(config).items():
    if key.endswith(("running_mean", "running_var")):
      assert not np.allclose(before[path], stats(core)[path])
      np.testing.assert_allclose(stats(core)[path], new_params[key], rtol=1e-5, atol=1e-6)
  # eval after the update uses the new running stats
  want_eval2, _ = np_forward(new_params, config, images, train=False)
  np.testing.assert_allclose(core(jnp.asarray(images), train=False)[0], want_eval2,
                             rtol=1e-4, atol=1e-4)


def test_batchnorm_running_stats_match_torch_mouse_by_mouse():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 3, 5, 3)) * np.array([1.0, 3.0])[:, None, None, None, None] \
      + np.array([0.0, 2.0])[:, None, None, None, None]
  x = x.astype(np.float32)
  mean0, var0 = rng.normal(size=3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
  scale, bias = rng.uniform(0.5, 1.5, 3).astype(np.float32), rng.normal(size=3).astype(np.float32)
  ours = stacked2d.BatchNorm(3, momentum=0.9)
  for var, value in ((ours.mean, mean0), (ours.var, var0), (ours.scale, scale), (ours.bias, bias)):
    var[...] = jnp.asarray(value)
  bn = torch.nn.BatchNorm2d(3, momentum=0.9)
  with torch.no_grad():
    for t, value in ((bn.running_mean, mean0), (bn.running_var, var0), (bn.weight, scale),
                     (bn.bias, bias)):
      t.copy_(torch.from_numpy(value))
  got = np.asarray(ours(jnp.asarray(x), train=True))
  bn.train()
  for m in range(2):  # the original: one core call per mouse, mouse 0 first
    want = bn(torch.from_numpy(x[m]).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(got[m], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours.mean[...], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours.var[...], bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
  bn.eval()
  want = bn(torch.from_numpy(x.reshape(8, 3, 5, 3)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
  np.testing.assert_allclose(ours(jnp.asarray(x), train=False).reshape(8, 3, 5, 3),
                             want.detach().numpy(), rtol=1e-5, atol=1e-5)


def np_regularizer(params, config):
  """gamma_hidden * group sparsity + gamma_input * LaplaceL2norm, from the original's formulas."""
  w = np.asarray(params["core.features.layer0.conv.weight"], np.float64)  # (O, I, k, k)
  pad = 1 if config.laplace_padding is None else config.laplace_padding
  filters = np.pad(w.reshape((-1,) + w.shape[2:]), ((0, 0), (pad, pad), (pad, pad)))
  size = filters.shape[-1] - 2
  lap = sum(LAPLACE[i, j] * filters[:, i:i + size, j:j + size]
            for i in range(3) for j in range(3))
  agg = np.mean if config.use_avg_reg else np.sum
  laplace = agg(lap**2) / agg(w**2)
  sparsity = 0.0
  if not config.depth_separable:
    for l in range(1, config.num_layers):
      wl = np.asarray(params[f"core.features.layer{l}.conv.weight"], np.float64)
      sparsity += np.sqrt((wl**2).sum(axis=(2, 3))).mean()
    sparsity /= max(config.num_layers - 1, 1)
  return config.core_reg_hidden * sparsity + config.core_reg_input * laplace


@pytest.mark.parametrize("name", ["default", "plain"])
def test_regularizer_matches_numpy(name):
  if name == "default":
    config, image_shape = Stacked2dConfig(), (36, 64, 1)
  else:
    config, image_shape = SMALL[name]
  core = Stacked2dCore(config, image_shape, rngs=nnx.Rngs(0))
  params = random_torch_params(config, image_shape[-1], 3)
  load(core, params, config)
  want = np_regularizer(params, config)
  if name == "default":  # gamma_input 6.3831, gamma_hidden 0 (and ignored: depth-separable)
    assert config.core_reg_input == 6.3831 and core.group_sparsity() == 0.0
  else:
    assert core.group_sparsity() > 0
  np.testing.assert_allclose(core.regularizer(), want, rtol=1e-5)


class TorchCore:
  """The original's module tree rebuilt from torch.nn layers (same names, shapes, order)."""

  def __init__(self, torch, config, in_ch):
    nn, cfg, c = torch.nn, config, config.hidden_channels

    class ShiftedELU(nn.Module):
      def forward(self, x):
        return nn.functional.elu(x - cfg.elu_shift[0]) + cfg.elu_shift[1]

    features = nn.Sequential()
    for l in range(cfg.num_layers):
      layer = collections.OrderedDict()
      if l == 0:
        layer["conv"] = nn.Conv2d(in_ch, c, cfg.input_kern, bias=cfg.bias and not cfg.batch_norm,
                                  padding=cfg.input_kern // 2 if cfg.pad_input else 0)
      else:
        k, i = hidden_kerns(cfg)[l - 1], c * (min(cfg.skip, l) if cfg.skip > 1 else 1)
        conv = {"padding": hidden_pad(cfg), "stride": cfg.stride, "bias": cfg.bias,
                "dilation": cfg.hidden_dilation}
        if cfg.depth_separable:
          layer["ds_conv"] = nn.Sequential(collections.OrderedDict(
              in_depth_conv=nn.Conv2d(i, c, 1, bias=cfg.bias),
              spatial_conv=nn.Conv2d(c, c, k, groups=c, **conv),
              out_depth_conv=nn.Conv2d(c, c, 1, bias=cfg.bias)))
        else:
          layer["conv"] = nn.Conv2d(i, c, k, **conv)
      if cfg.batch_norm:
        layer["norm"] = nn.BatchNorm2d(c, momentum=cfg.momentum)
      if not cfg.linear and (l < cfg.num_layers - 1 or cfg.final_nonlinearity):
        layer["nonlin"] = ShiftedELU()
      if l != 0 and l != cfg.num_layers - 1:
        layer["dropout"] = nn.Dropout2d(p=cfg.dropout)
      features.add_module(f"layer{l}", nn.Sequential(layer))
    self.torch, self.config = torch, cfg
    self.model = nn.Module()
    self.model.core = nn.Module()
    self.model.core.features = features

  def __call__(self, x_NCHW):
    outs, cfg = [], self.config
    for l, fn in enumerate(self.model.core.features):
      do_skip = l >= 1 and cfg.skip > 1
      x_NCHW = fn(x_NCHW if not do_skip else self.torch.cat(outs[-min(cfg.skip, l):], dim=1))
      outs.append(x_NCHW)
    return self.torch.cat([outs[i] for i in stacked(cfg)], dim=1)


def test_default_config_parameter_count_keys_and_shapes_match_torch():
  torch = pytest.importorskip("torch")
  config = Stacked2dConfig()
  assert (config.num_layers, config.hidden_channels, config.input_kern, config.hidden_kern,
          config.momentum, config.depth_separable, config.stack, config.pad_input) == (
              4, 64, 9, 7, 0.9, True, -1, False)
  core = nnx.eval_shape(lambda: Stacked2dCore(config, (36, 64, 1), rngs=nnx.Rngs(0)))
  assert core.output_shape == (28, 56, 64)  # 36 - 9 + 1, 64 - 9 + 1; hidden padding 3 keeps it
  # layer0: conv 64*1*9*9 = 5184 (no bias, BN follows) + BN 2*64 = 5312;
  # layer1-3: 1x1 64*64+64 = 4160, depthwise 64*1*7*7+64 = 3200, 1x1 4160, BN 128 = 11648 each;
  # total 5312 + 3 * 11648 = 40256.
  ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(core, nnx.Param)))
  assert ours == 5312 + 3 * (4160 + 3200 + 4160 + 128) == 40256
  reference = TorchCore(torch, config, 1).model
  assert sum(p.numel() for p in reference.parameters()) == 40256
  state_dict = reference.state_dict()
  keys = stacked2d.torch_keys(config)
  assert set(keys) == set(state_dict) == set(torch_shapes(config, 1))
  flat = dict(nnx.to_flat_state(nnx.state(core)))
  for key, (path, kind) in keys.items():
    shape = tuple(state_dict[key].shape)
    if kind == "skip":
      assert key.endswith("num_batches_tracked") and path not in flat
      continue
    want = tuple(shape[i] for i in (2, 3, 1, 0)) if kind == "conv" else shape
    assert flat[path].shape == want, key
  assert len(flat) == len(keys) - 4  # every variable of ours has a key (4 skipped counters)


@pytest.mark.parametrize("name", ["ds", "plain"])
def test_forward_and_regularizer_match_torch_rebuild(name):
  torch = pytest.importorskip("torch")
  config, core, params, images = build(name, seed=5)
  ref = TorchCore(torch, config, images.shape[-1])
  state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in params.items()}
  state.update({k: torch.tensor(0) for k in ref.model.state_dict() if k not in state})
  ref.model.load_state_dict(state, strict=True)
  ref.model.train()
  got = np.asarray(core(jnp.asarray(images), train=True)[0])
  for m in range(2):
    x = torch.from_numpy(images[m]).permute(0, 3, 1, 2)
    want = ref(x).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(got[m], want, rtol=1e-4, atol=1e-4)
  ref.model.eval()
  x = torch.from_numpy(images.reshape((6,) + images.shape[2:])).permute(0, 3, 1, 2)
  want = ref(x).permute(0, 2, 3, 1).detach().numpy().reshape(got.shape)
  np.testing.assert_allclose(core(jnp.asarray(images), train=False)[0], want, rtol=1e-4,
                             atol=1e-4)
  # LaplaceL2norm with F.conv2d as in the original (sum aggregation for "ds", mean for "plain")
  w = ref.model.core.features[0].conv.weight.detach()
  pad = 1 if config.laplace_padding is None else config.laplace_padding
  lap = torch.nn.functional.conv2d(w.reshape(-1, 1, *w.shape[2:]),
                                   torch.from_numpy(LAPLACE[None, None].astype(np.float32)),
                                   padding=pad)
  agg = torch.mean if config.use_avg_reg else torch.sum
  np.testing.assert_allclose(core.laplace(), (agg(lap**2) / agg(w**2)).item(), rtol=1e-5)


def test_init_is_xavier_normal_with_zero_bias_and_identity_batchnorm():
  core = Stacked2dCore(Stacked2dConfig(), (36, 64, 1), rngs=nnx.Rngs(0))
  first = np.asarray(core.layers[0].conv.kernel[...])
  np.testing.assert_allclose(first.std(), np.sqrt(2 / (81 + 64 * 81)), rtol=0.05)
  assert abs(first.mean()) < 0.002 and np.abs(first).max() > 3.5 * first.std()  # not truncated
  ds = core.layers[1].ds_conv
  np.testing.assert_allclose(ds.in_depth_conv.kernel[...].std(), np.sqrt(2 / 128), rtol=0.05)
  np.testing.assert_allclose(ds.spatial_conv.kernel[...].std(), np.sqrt(2 / (49 + 64 * 49)),
                             rtol=0.05)
  for conv in (ds.in_depth_conv, ds.spatial_conv, ds.out_depth_conv):
    assert not np.any(conv.bias[...])
  assert core.layers[0].conv.bias is None
  norm = core.layers[2].norm
  assert np.all(norm.scale[...] == 1) and not np.any(norm.bias[...])
  assert not np.any(norm.mean[...]) and np.all(norm.var[...] == 1)


def test_dropout2d_drops_whole_channels_and_bf16_runs():
  config = Stacked2dConfig(num_layers=3, hidden_channels=8, input_kern=3, hidden_kern=3,
                           dropout=0.5)
  core = Stacked2dCore(config, (8, 8, 1), rngs=nnx.Rngs(0))
  assert [layer.dropout for layer in core.layers] == [0.0, 0.5, 0.0]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6, 6, 8)), jnp.float32)
  plain = np.asarray(core.layers[1](x, train=False, key=None))
  dropped = np.asarray(core.layers[1](x, train=False, key=jax.random.key(1)))
  zero = np.all(dropped == 0, axis=(2, 3))  # [M, B, C]: decided per image and channel
  assert 0 < zero.mean() < 1
  kept = np.broadcast_to(~zero[:, :, None, None], dropped.shape)
  np.testing.assert_allclose(dropped[kept], plain[kept] * 2, rtol=1e-6)
  bf16 = Stacked2dCore(config, (8, 8, 1), compute_dtype="bfloat16", rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 8, 8, 1)), jnp.float32)
  got = bf16(images, train=False)[0]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, core(images, train=False)[0], rtol=0.05, atol=0.05)


def test_config_and_behavior_errors():
  with pytest.raises(ValueError, match=r"\['layers'\]"):
    Stacked2dConfig.from_config({"num_layers": 2, "layers": 3})
  config = Stacked2dConfig.from_config({"hidden_kern": [3, 5], "num_layers": 3, "stack": [0, 2]})
  assert config.hidden_kern == (3, 5) and config.stack == (0, 2) and config.hidden_pad == 1
  assert Stacked2dConfig(stack=None).stacked_layers == (0, 1, 2, 3)
  assert Stacked2dConfig(stack=-2).stacked_layers == (2, 3)
  with pytest.raises(ValueError, match="feature maps"):  # layer 2 (kernel 5, padding 1) shrinks
    Stacked2dCore(config, (12, 16, 1), rngs=nnx.Rngs(0))
  core = Stacked2dCore(Stacked2dConfig(num_layers=1, hidden_channels=2, input_kern=3),
                       (5, 5, 4), rngs=nnx.Rngs(0))  # behavior_mode 1: 1 + 3 image channels
  assert core.output_shape == (3, 3, 2)
  with pytest.raises(ValueError, match=r"\(0, 1\)"):
    core(jnp.zeros((1, 2, 5, 5, 4)), jnp.zeros((1, 2, 3)), train=False)
