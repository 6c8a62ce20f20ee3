"""Most exciting inputs: gradient ascent on the image, every (neuron, seed) pair at once."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from v1t_jax.insilico.subject import Progress, Subject, blur_matrix, check_neurons


def _blur(x_BxHxWxC, blur_y_HxH, blur_x_WxW):
  return jnp.einsum("yh,bhwc,xw->byxc", blur_y_HxH, x_BxHxWxC, blur_x_WxW)


def fourier_scale(h: int, w: int, decay: float) -> np.ndarray:
  """[h, w // 2 + 1] amplitude scale 1 / f^decay of an rfft2 parametrisation (Olah et al. 2017),
  the lowest frequency 1 / max(h, w) standing in for f = 0; unit mean square."""
  f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
  s = 1.0 / np.maximum(f, 1.0 / max(h, w)) ** decay
  return (s / np.sqrt((s**2).mean())).astype(np.float32)


def _roll_each(x_BxHxWxC, shifts_Bx2):
  return jax.vmap(lambda im, s: jnp.roll(im, (s[0], s[1]), axis=(0, 1)))(x_BxHxWxC, shifts_Bx2)


# ---------------------------------------------------------------------------------------------
# Most exciting inputs.


def meis(subject: Subject, neurons: Sequence[int], *, seeds: Sequence[int] = (0, 1, 2, 3),
         steps: int = 80, lr: float = 0.1, optimizer: str = "adam", norm: float | None = 10.0,
         clip: bool = True, precondition: str = "blur", blur_sigma: float = 1.0,
         fourier_decay: float = 1.0, jitter: int = 1, init_std: float = 0.1,
         progress: bool = False) -> dict:
  """Most exciting inputs by gradient ascent on the image (sinzlab/mei's `gradient_ascent`).

  All (neuron, seed) pairs are optimised at once: one batch, one jitted step. Each step the
  image is decoded from its parameters (`precondition="fourier"`: a 1/f^decay-scaled spectrum;
  otherwise the pixels), scaled to L2 norm `norm` (fixed contrast, model-input units; None =
  free) and clipped to the pixel range of raw grey levels 0-255 (`clip`); it is shifted by a
  random offset of up to `jitter` pixels per axis, and the neuron's response is maximised with
  optax (`optimizer` "adam" or "sgd", learning rate `lr`). `precondition="blur"` smooths the
  gradient with a Gaussian of `blur_sigma` pixels. The initial image depends only on the seed,
  so a neuron's MEI does not depend on the other neurons in the batch.

  Returns images [n, S, h, w, c] (model inputs; `images_raw` in grey levels is added by
  callers that know the mouse's statistics), activations [n, S] (final image, no jitter),
  trace [steps, n, S] (activation at each step), neurons [n], seeds [S], norms [n, S].
  """
  if not subject.differentiable:
    raise ValueError(f"MEIs need gradients: {subject.name} is not a JAX function")
  if precondition not in ("blur", "fourier", "none"):
    raise ValueError(f"precondition must be 'blur', 'fourier' or 'none', got {precondition!r}")
  if optimizer not in ("adam", "sgd"):
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  neurons = check_neurons(subject, neurons)
  seeds = [int(s) for s in seeds]
  h, w, c = subject.image_hwc
  n, s = len(neurons), len(seeds)
  # Only the neurons asked for: a trained model's readout then skips all the others.
  chosen = subject.restricted(neurons)
  target_P = jnp.asarray(np.repeat(np.arange(n), s))   # each image's neuron, in `chosen`
  seed_P = np.tile(np.asarray(seeds), n)
  lo, hi = jnp.asarray(subject.pixel_min), jnp.asarray(subject.pixel_max)

  init_by_seed = {sd: np.asarray(jax.random.normal(jax.random.key(sd), (h, w, c))) * init_std
                  for sd in seeds}
  x0_PxHxWxC = np.stack([init_by_seed[sd] for sd in seed_P.tolist()])
  if precondition == "fourier":
    scale = jnp.asarray(fourier_scale(h, w, fourier_decay))[None, :, :, None]
    # Orthonormal transform: spectrum coefficients on the pixels' scale, so one lr suits both.
    spec = np.fft.rfft2(x0_PxHxWxC, axes=(1, 2), norm="ortho") / np.asarray(scale)
    param = jnp.asarray(np.stack([spec.real, spec.imag]).astype(np.float32))

    def decode(p):
      return jnp.fft.irfft2((p[0] + 1j * p[1]) * scale, s=(h, w), axes=(1, 2), norm="ortho")
  else:
    param = jnp.asarray(x0_PxHxWxC)
    decode = lambda p: p  # noqa: E731

  def constrain(x_PxHxWxC):
    if norm is not None:
      length = jnp.sqrt(jnp.sum(x_PxHxWxC**2, axis=(1, 2, 3), keepdims=True))
      x_PxHxWxC = x_PxHxWxC * (norm / jnp.maximum(length, 1e-8))
    return jnp.clip(x_PxHxWxC, lo, hi) if clip else x_PxHxWxC

  def activation(x_PxHxWxC):
    r_Pxn = chosen.respond(x_PxHxWxC)
    return jnp.take_along_axis(r_Pxn, target_P[:, None], axis=1)[:, 0]

  blur_y, blur_x = jnp.asarray(blur_matrix(h, blur_sigma)), jnp.asarray(blur_matrix(w, blur_sigma))
  tx = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)
  keys_P = jax.vmap(jax.random.key)(jnp.asarray(seed_P))

  def objective(p, step):
    x = constrain(decode(p))
    if jitter:
      shifts = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, step), (2,), -jitter,
                                                     jitter + 1))(keys_P)
      x = _roll_each(x, shifts)
    act_P = activation(x)
    return -jnp.sum(act_P), act_P

  @jax.jit
  def update(p, opt_state, step):
    (_, act_P), g = jax.value_and_grad(objective, has_aux=True)(p, step)
    if precondition == "blur":
      g = _blur(g, blur_y, blur_x)
    updates, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, act_P

  opt_state = tx.init(param)
  trace = np.zeros((steps, n * s), np.float32)
  report = Progress("MEI steps", steps, progress)
  for step in range(steps):
    param, opt_state, act = update(param, opt_state, jnp.int32(step))
    trace[step] = np.asarray(act)
    report(step + 1)
  final = jax.jit(lambda p: (constrain(decode(p)),))(param)[0]
  act = np.asarray(jax.jit(activation)(final))
  images = np.asarray(final).reshape(n, s, h, w, c)
  return {"images": images, "activations": act.reshape(n, s),
          "trace": trace.reshape(steps, n, s), "neurons": neurons, "seeds": np.asarray(seeds),
          "norms": np.sqrt((images**2).sum(axis=(2, 3, 4)))}

