"""The PyTorch reference of scripts/bench_torch_reference.py against our JAX model.

Skipped without torch. Both models are built with the same tiny configuration; the torch
model's state_dict (random weights, §10 naming) goes into the JAX model through
`import_torch.import_state_dict`, and the JAX model goes back into a fresh torch model through
`import_torch.export_state_dict` + a strict `load_state_dict`. Then, on the same images,
behaviour and pupil centres: eval-mode predictions, the eval-mode objective (Poisson loss with
ds_scale + L1 regularisers) and its gradient with respect to every parameter must agree to
float32 rounding.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from v1t_jax import import_torch, losses  # noqa: E402
from v1t_jax.model import V1T, ModelConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = ("S1", "A")
COUNTS = (7, 4)    # mouse A is padded to 7 on our side
N_TRAIN = (120, 90)
BATCH = 3

# name -> (shared fields of both configs, image H, W). "narrow": small widths, patch 4 at
# stride 2; "default_widths": the default D, H, M, patch 8 at stride 1 (one block, 16x24 image).
VARIANTS = {
    "mode3_narrow": (dict(emb_dim=8, num_heads=2, num_blocks=2, mlp_dim=12, patch_size=4,
                          patch_stride=2, behavior_mode=3), (12, 16)),
    "mode4_narrow": (dict(emb_dim=8, num_heads=2, num_blocks=2, mlp_dim=12, patch_size=4,
                          patch_stride=2, behavior_mode=4, shifter_reg_scale=0.3), (12, 16)),
    "mode2_noshift": (dict(emb_dim=8, num_heads=2, num_blocks=1, mlp_dim=12, patch_size=4,
                           patch_stride=2, behavior_mode=2, shift_mode=0), (12, 16)),
    "mode3_default_widths": (dict(num_blocks=1), (16, 24)),
}


@pytest.fixture(scope="module")
def ref():
  """The script as a module (scripts/ is not a package); importing it calls no mallopt."""
  path = os.path.join(ROOT, "scripts", "bench_torch_reference.py")
  spec = importlib.util.spec_from_file_location("bench_torch_reference", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up
  try:
    spec.loader.exec_module(module)
  finally:
    del sys.modules[spec.name]
  return module


def randomise(model, seed):
  """Weights far from the init (which makes a near-constant model): each Linear ~ 1.5/sqrt(in),
  LayerNorms 1 + 0.2 z, strong shifters (some neurons leave the map, zero padding in use)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      z = torch.randn(p.shape, generator=gen)
      if name.endswith(("cls_token", "pos_embedding")):
        p.copy_(z)
      elif "layer_norm" in name or ".mlp.model.0." in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * z)
      elif name.endswith("features"):
        p.copy_(z / p.shape[1] ** 0.5)
      elif name.endswith(("sigma", "readouts.S1.bias", "readouts.A.bias")):
        p.copy_(0.3 * z)
      elif name.startswith("core_shifter"):
        p.copy_(0.8 * z)
      elif p.ndim == 2:
        p.copy_(1.5 * z / p.shape[1] ** 0.5)
      else:   # Linear biases
        p.copy_(0.2 * z)


def build_pair(ref, variant, seed=0, zero_sigma=False, **extra):
  fields, image_hw = VARIANTS[variant]
  fields = {**fields, **extra}
  rng = np.random.default_rng(seed)
  coords = rng.uniform(-300, 300, (len(IDS), max(COUNTS), 3)).astype(np.float32)
  cfg = ref.Config(image_size=image_hw, **fields)
  torch.manual_seed(seed)
  torch_model = ref.V1T(cfg, {m: coords[i, :n] for i, (m, n) in enumerate(zip(IDS, COUNTS))},
                        input_shape=(1,) + image_hw)
  randomise(torch_model, seed)
  if zero_sigma:
    with torch.no_grad():
      for readout in torch_model.readouts.values():
        readout.sigma.zero_()
  jax_model = V1T(ModelConfig(**fields), neuron_counts=COUNTS, coordinates=coords,
                  image_shape=image_hw + (1,), rngs=nnx.Rngs(seed))
  state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  report = import_torch.import_state_dict(jax_model, state_dict)   # strict: every key, shape
  assert report["naming"] == "head" and report["mouse_ids"] == list(IDS)
  return cfg, torch_model, jax_model, image_hw


def make_batch(image_hw, seed=1):
  rng = np.random.default_rng(seed)
  m = len(IDS)
  return {"image": rng.standard_normal((m, BATCH) + image_hw + (1,)).astype(np.float32),
          "behavior": np.abs(rng.standard_normal((m, BATCH, 3))).astype(np.float32),
          "pupil_center": rng.standard_normal((m, BATCH, 2)).astype(np.float32),
          "responses": rng.gamma(0.5, 1.0, (m, BATCH, max(COUNTS))).astype(np.float32),
          "valid": np.ones((m, BATCH), bool)}


def torch_batch(batch, m):
  n = COUNTS[m]
  return {"image": torch.from_numpy(batch["image"][m].transpose(0, 3, 1, 2).copy()),
          "behavior": torch.from_numpy(batch["behavior"][m]),
          "pupil_center": torch.from_numpy(batch["pupil_center"][m]),
          "responses": torch.from_numpy(batch["responses"][m, :, :n].copy())}


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_eval_forward_objective_and_gradients_agree(ref, variant):
  cfg, torch_model, jax_model, image_hw = build_pair(ref, variant)
  batch = make_batch(image_hw)
  inputs = [jnp.asarray(batch[k]) for k in ("image", "behavior", "pupil_center")]
  with jax.default_matmul_precision("float32"):   # jitted: one compile instead of op by op
    pred, aux = nnx.jit(lambda model, *x: model(*x, train=False))(jax_model, *inputs)
  pred = np.asarray(pred)
  torch_model.eval()
  for m, (mouse, n) in enumerate(zip(IDS, COUNTS)):
    tb = torch_batch(batch, m)
    with torch.no_grad():
      want, images, _ = torch_model(tb["image"], mouse, tb["behavior"], tb["pupil_center"])
    torch.testing.assert_close(images, tb["image"])   # the cropper is the identity here
    want = want.numpy()
    assert np.ptp(want) > 0.1, "a degenerate comparison"
    np.testing.assert_allclose(pred[m, :, :n], want, rtol=2e-5, atol=2e-6, err_msg=mouse)
    if cfg.shift_mode == 2:   # some neurons sampled off the map: zero padding is compared too
      assert np.abs(np.asarray(aux["shift"][m])).max() > 0.2

  # The objective (sum over mice of J_m) and its gradient, eval mode.
  def objective(model, batch):
    return losses.objective(model, batch, N_TRAIN, train=False)

  with jax.default_matmul_precision("float32"):
    (total, aux), grads = nnx.jit(nnx.value_and_grad(objective, has_aux=True))(
        jax_model, {k: jnp.asarray(v) for k, v in batch.items()})
  torch_model.zero_grad()
  torch_total = 0.0
  for m, mouse in enumerate(IDS):
    j_m, _, _ = ref.objective(torch_model, torch_batch(batch, m), mouse, N_TRAIN[m])
    np.testing.assert_allclose(float(aux["total"][m]), float(j_m.detach()), rtol=1e-5,
                               err_msg=mouse)
    j_m.backward()   # accumulated over the mice, as the original before its optimizer step
    torch_total += float(j_m.detach())
  np.testing.assert_allclose(float(total), torch_total, rtol=1e-5)

  # Our gradients in the original's layout: a copy of the model holding them, exported.
  grad_model = nnx.clone(jax_model)
  nnx.update(grad_model, grads)
  jax_grads = import_torch.export_state_dict(grad_model, list(IDS))
  # No gradient in torch = not used (the readouts' sigma in eval mode): zero on our side.
  torch_grads = {k: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy()
                 for k, p in torch_model.named_parameters()}
  assert {k for k, p in torch_model.named_parameters() if p.grad is None} == {
      f"readouts.{m}.sigma" for m in IDS}
  assert set(torch_grads) <= set(jax_grads)
  for key, want in torch_grads.items():
    scale = np.abs(want).max()
    assert np.abs(jax_grads[key] - want).max() <= 1e-4 * scale + 1e-6, (
        key, relative_error(jax_grads[key], want))


def test_train_mode_without_noise_agrees(ref):
  """Train mode with every dropout rate 0 and sigma 0: the training code paths (readout
  sampling, dropout calls, our chunked attention with a key) must give the eval prediction."""
  _, torch_model, jax_model, image_hw = build_pair(ref, "mode3_narrow", zero_sigma=True,
                                                   p_dropout=0.0, t_dropout=0.0)
  batch = make_batch(image_hw, seed=3)
  pred, _ = jax_model(*(jnp.asarray(batch[k]) for k in ("image", "behavior", "pupil_center")),
                      train=True, key=jax.random.key(0))
  torch_model.train()
  for m, (mouse, n) in enumerate(zip(IDS, COUNTS)):
    tb = torch_batch(batch, m)
    with torch.no_grad():
      want = torch_model(tb["image"], mouse, tb["behavior"], tb["pupil_center"])[0].numpy()
    np.testing.assert_allclose(np.asarray(pred)[m, :, :n], want, rtol=2e-5, atol=2e-6,
                               err_msg=mouse)


def test_export_loads_strictly_into_the_reference(ref):
  """Our model -> §10 state_dict -> a fresh reference model (strict): same keys, same values,
  same predictions; so the reference's naming is the one import_torch reads and writes."""
  cfg, torch_model, jax_model, image_hw = build_pair(ref, "mode3_narrow")
  exported = import_torch.export_state_dict(jax_model, list(IDS), raw_image_hw=image_hw)
  fresh = ref.V1T(cfg, {m: np.zeros((n, 3), np.float32) for m, n in zip(IDS, COUNTS)},
                  input_shape=(1,) + image_hw)
  assert set(exported) == set(fresh.state_dict())
  fresh.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)
  for key, value in torch_model.state_dict().items():
    np.testing.assert_allclose(fresh.state_dict()[key].numpy(), value.numpy(), rtol=1e-6,
                               atol=1e-7, err_msg=key)
  batch = make_batch(image_hw, seed=5)
  fresh.eval()
  torch_model.eval()
  for m, mouse in enumerate(IDS):
    tb = torch_batch(batch, m)
    with torch.no_grad():
      a = fresh(tb["image"], mouse, tb["behavior"], tb["pupil_center"])[0]
      b = torch_model(tb["image"], mouse, tb["behavior"], tb["pupil_center"])[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_counts_and_check_mode(ref):
  """§10.1's counts for the default configuration (built, not run) and the script's --check."""
  result = ref.default_counts()
  assert not result["problems"], result["problems"]
  assert result["counts"]["core"] == 2_465_200
  assert result["counts"]["readouts"]["S1"] == 1_206_232
  assert result["counts"]["total"] == 9_953_334
  assert ref.check()["check"] == "ok"
