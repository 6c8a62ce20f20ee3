r"""PyTorch reference of the default V1T and its CPU benchmark (the baseline of our JAX bench).

  /tmp/torchvenv/bin/python scripts/bench_torch_reference.py --malloc=glibc
  /tmp/torchvenv/bin/python scripts/bench_torch_reference.py --malloc=stock
  /tmp/torchvenv/bin/python scripts/bench_torch_reference.py --what=train_step --threads=1
  /tmp/torchvenv/bin/python scripts/bench_torch_reference.py --check
  /tmp/torchvenv/bin/python scripts/bench_torch_reference.py --count_params

The model is written from `docs/model_spec.md` (the original `bryanlimy/V1T` at HEAD) and
nothing else: image cropper (§2.4), ViT core with behaviour MLPs (§3), per-mouse core shifter
(§5.1), per-mouse Gaussian2d readout (§4), ELU+1 (§6), Poisson loss with ds_scale plus the L1
regularisers (§7), AdamW with weight_decay 0 (§8.1). Modules, attributes and buffers follow the
original's state_dict naming (§10, HEAD), so `model.state_dict()` is what
`v1t_jax.import_torch.import_state_dict` reads and `export_state_dict` writes. Only the parts the
default configuration uses are here (patch_mode 0, no LSA, shift_mode 0/2, behavior_mode
0/2/3/4, bias_mode 0, grid predictor on).

Benchmark (the issue's protocol): fp32, batch 16, one mouse per step (S1, 7,538 neurons),
36x64x1 images (the JAX bench's stand-in shapes; `--image_hw=144,256` feeds raw-size images
through the cropper's grid_sample + resize as the original data path does), behaviour 3 + pupil
centre 2. `forward` is the eval-mode model plus the Poisson loss under torch.no_grad();
`train_step` is zero_grad + train-mode forward (dropout, readout sampling) + loss + regulariser +
backward + AdamW step. Each prints one JSON line: the median of `--iters` timed calls after
`--warmup` untimed ones, the peak RSS of the measurement (VmHWM, reset before its warm-up), and
the environment (torch version, threads, allocator, load average).

`--malloc=glibc` (default) calls mallopt before torch is imported, exactly as
`v1t_jax/allocator.py` does (one arena, no mmap'd chunks, never trim: freed memory stays in the
process, the issue's "allocator tuned to keep freed memory"); `--malloc=stock` leaves glibc's
defaults. The flag is read first thing, when the file runs as a script; importing this file
(tests) changes nothing.

`--check` runs on tiny shapes (seconds of CPU): output shape and sign, finite loss, one train
step changing the stepped mouse's parameters (and not the other mouse's), the state_dict keys and
shapes of §10, and the parameter counts of the default configuration against §10.1 (built, never
run).
"""

from __future__ import annotations

import os
import sys

# The repository's allocator settings (ctypes only) and memory probes (no JAX import).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from v1t_jax import allocator  # noqa: E402


def _malloc_flag(argv) -> str:
  """--malloc's value from the raw command line (argparse runs after torch is imported)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--malloc="):
      return arg.split("=", 1)[1]
    if arg == "--malloc" and i + 1 < len(argv):
      return argv[i + 1]
  return "glibc"


GLIBC_TUNED = None   # set when run as a script: whether mallopt accepted the settings
if __name__ == "__main__":   # first thing: before torch (and its thread pools) exist
  GLIBC_TUNED = allocator.keep_freed_memory() if _malloc_flag(sys.argv[1:]) == "glibc" else False

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from v1t_jax.bench import (  # noqa: E402
    allocator_in_use, flops_by_part, peak_rss_gib, reset_peak_rss)

GIB = 2.0**30
POISSON_EPS = float(np.finfo(np.float32).eps)   # 1.1920929e-07 (§7)
SENSORIUM_PLUS_NEURONS = {"S1": 7538, "A": 8372, "B": 7344, "C": 7334, "D": 8107, "E": 8098}
N_TRAIN = 4500   # training trials per mouse for ds_scale, as v1t_jax.bench
# §10.1, default configuration (behavior_mode 3).
SPEC_CORE_PARAMS = 2_465_200
SPEC_SHIFTER_PARAMS = 57
SPEC_TOTAL_6_MICE = 9_953_334


def spec_readout_params(num_neurons: int) -> int:
  return 160 * num_neurons + 152   # §10.1


@dataclasses.dataclass(frozen=True)
class Config:
  """The original's flags that shape the model and the step (defaults: model_spec.md §12)."""

  patch_size: int = 8
  patch_stride: int = 1
  emb_dim: int = 155
  num_heads: int = 4
  num_blocks: int = 4
  mlp_dim: int = 488
  p_dropout: float = 0.0229
  t_dropout: float = 0.2544
  drop_path: float = 0.0
  behavior_mode: int = 3   # 0 none, 2 behaviour (3), 3 behaviour + pupil centre (5), 4 per mouse
  shift_mode: int = 2      # 0 none, 2 core shifter
  center_crop: float = 1.0
  resize_image: bool = True
  image_size: tuple = (36, 64)
  core_reg_scale: float = 0.5379
  readout_reg_scale: float = 0.0076
  shifter_reg_scale: float = 0.0
  ds_scale: bool = True
  lr: float = 0.001647
  adam_beta1: float = 0.9
  adam_beta2: float = 0.9999
  adam_eps: float = 1e-8

  def __post_init__(self):
    if self.behavior_mode not in (0, 2, 3, 4):
      raise ValueError(f"behavior_mode {self.behavior_mode}: only 0, 2, 3, 4 are written here")
    if self.shift_mode not in (0, 2):
      raise ValueError(f"shift_mode {self.shift_mode}: only 0 and 2 are written here")

  @property
  def behavior_dim(self) -> int:
    return {0: 0, 2: 3, 3: 5, 4: 5}[self.behavior_mode]


# ---------------------------------------------------------------------------------------------
# Image cropper (§2.4).


class ImageCropper(nn.Module):
  """Nearest grid_sample on a fixed grid (identity at center_crop 1), then bilinear resize
  without antialiasing (torchvision Resize(antialias=False) == F.interpolate, align_corners
  False). No image shifter (shift_mode 1/3/4 is not written here)."""

  def __init__(self, input_shape, *, center_crop: float, resize_image: bool, image_size):
    super().__init__()
    _, height, width = input_shape
    s = center_crop
    ys = torch.linspace(-s, s, int(height * s))
    xs = torch.linspace(-s, s, int(width * s))
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    self.register_buffer("grid", torch.stack([gx, gy], dim=-1)[None])   # (1, Hc, Wc, 2): x, y
    self.resize_image = resize_image
    self.image_size = tuple(image_size)

  def forward(self, inputs):
    grid = self.grid.expand(inputs.shape[0], -1, -1, -1)
    images = F.grid_sample(inputs, grid, mode="nearest", padding_mode="zeros",
                           align_corners=True)
    if self.resize_image and tuple(images.shape[-2:]) != self.image_size:
      images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False,
                             antialias=False)
    return images, grid


# ---------------------------------------------------------------------------------------------
# ViT core (§3).


def find_shape(num_patches: int) -> tuple[int, int]:
  """§3.3: h = the largest divisor of n_p that is <= ceil(sqrt(n_p)); w = n_p / h."""
  h = math.ceil(math.sqrt(num_patches))
  while num_patches % h:
    h -= 1
  return h, num_patches // h


class Transpose(nn.Module):
  """einops "b c l -> b l c" (the Rearrange slot, index 1, of the patch projection)."""

  def forward(self, x):
    return x.transpose(1, 2)


class Image2Patches(nn.Module):
  """patch_mode 0 (§3.1): Unfold(P, S) + Linear(C P^2 -> D) (projection.2), cls token prepended,
  learned positional embedding (T, D), dropout p_dropout."""

  def __init__(self, image_shape, *, patch_size, stride, emb_dim, dropout):
    super().__init__()
    channels, height, width = image_shape
    rows = (height - patch_size) // stride + 1
    cols = (width - patch_size) // stride + 1
    self.num_patches = rows * cols
    self.projection = nn.Sequential(
        nn.Unfold(kernel_size=patch_size, stride=stride),   # (B, C P^2, L), channel-major
        Transpose(),
        nn.Linear(channels * patch_size * patch_size, emb_dim),   # PyTorch default init
    )
    self.cls_token = nn.Parameter(torch.randn(1, 1, emb_dim))                 # N(0, 1)
    self.pos_embedding = nn.Parameter(torch.randn(self.num_patches + 1, emb_dim))   # N(0, 1)
    self.dropout = nn.Dropout(p=dropout)

  def forward(self, inputs):
    patches = self.projection(inputs)
    cls = self.cls_token.expand(inputs.shape[0], -1, -1)
    outputs = torch.cat([cls, patches], dim=1) + self.pos_embedding
    return self.dropout(outputs)


class Attention(nn.Module):
  """Pre-norm MHA with full-width heads (§3.2): head dim = D, inner H D, scale D^-1/2 (a
  buffer), qkv without bias, dropout on the probabilities and after the output projection."""

  def __init__(self, emb_dim, num_heads, dropout):
    super().__init__()
    inner = emb_dim * num_heads
    self.num_heads = num_heads
    self.register_buffer("scale", torch.tensor(emb_dim**-0.5))
    self.layer_norm = nn.LayerNorm(emb_dim)   # eps 1e-5
    self.to_qkv = nn.Linear(emb_dim, inner * 3, bias=False)
    self.dropout = nn.Dropout(p=dropout)
    self.projection = nn.Sequential(nn.Linear(inner, emb_dim), nn.Dropout(p=dropout))

  def forward(self, inputs):
    b, t, _ = inputs.shape
    qkv = self.to_qkv(self.layer_norm(inputs)).chunk(3, dim=-1)
    # "b n (h d) -> b h n d": head-major, head h owns dims [h D, (h + 1) D).
    q, k, v = (x.reshape(b, t, self.num_heads, -1).transpose(1, 2) for x in qkv)
    dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
    attn = self.dropout(dots.softmax(dim=-1))
    outputs = torch.matmul(attn, v)
    outputs = outputs.transpose(1, 2).reshape(b, t, -1)   # "b h n d -> b n (h d)"
    return self.projection(outputs)


class MLP(nn.Module):
  """model: LayerNorm, Linear(D -> M), exact GELU, Dropout, Linear(M -> D), Dropout (§3.2)."""

  def __init__(self, emb_dim, mlp_dim, dropout):
    super().__init__()
    self.model = nn.Sequential(
        nn.LayerNorm(emb_dim),
        nn.Linear(emb_dim, mlp_dim),
        nn.GELU(),   # approximate="none": erf
        nn.Dropout(p=dropout),
        nn.Linear(mlp_dim, emb_dim),
        nn.Dropout(p=dropout),
    )

  def forward(self, inputs):
    return self.model(inputs)


class BehaviorMLP(nn.Module):
  """B-MLP (§3.2): Linear(d_b -> D//2), tanh, Dropout(p=0), Linear(-> D), tanh; one under
  models.share (modes 2, 3) or one per mouse (mode 4)."""

  def __init__(self, behavior_dim, emb_dim, keys):
    super().__init__()
    self.models = nn.ModuleDict({
        key: nn.Sequential(
            nn.Linear(behavior_dim, emb_dim // 2),
            nn.Tanh(),
            nn.Dropout(p=0.0),   # the original never passes its dropout argument
            nn.Linear(emb_dim // 2, emb_dim),
            nn.Tanh(),
        ) for key in keys})

  def forward(self, behaviors, mouse_id):
    key = "share" if "share" in self.models else mouse_id
    return self.models[key](behaviors)


class DropPath(nn.Module):
  """Stochastic depth (§3.2): zero whole samples in training; identity at rate 0."""

  def __init__(self, drop_prob):
    super().__init__()
    self.register_buffer("keep_prop", torch.tensor(1.0 - drop_prob))

  def forward(self, inputs):
    if not self.training or float(self.keep_prop) == 1.0:
      return inputs
    shape = (inputs.shape[0],) + (1,) * (inputs.ndim - 1)
    mask = inputs.new_empty(shape).bernoulli_(self.keep_prop)
    return inputs / self.keep_prop * mask


class Transformer(nn.Module):
  """L pre-norm blocks (§3.2): t += B-MLP(b) (all tokens), t += DropPath(MHA(t)),
  t += DropPath(MLP(t)). Init: Linear N(0, 0.02^2) (trunc. at +-2, in effect untruncated),
  bias 0, LayerNorm 1/0, for every module here, B-MLPs included."""

  def __init__(self, cfg: Config, mouse_ids):
    super().__init__()
    blocks = []
    for _ in range(cfg.num_blocks):
      block = {"mha": Attention(cfg.emb_dim, cfg.num_heads, cfg.t_dropout),
               "mlp": MLP(cfg.emb_dim, cfg.mlp_dim, cfg.t_dropout)}
      if cfg.behavior_dim:
        keys = list(mouse_ids) if cfg.behavior_mode == 4 else ["share"]
        block["b-mlp"] = BehaviorMLP(cfg.behavior_dim, cfg.emb_dim, keys)
      blocks.append(nn.ModuleDict(block))
    self.blocks = nn.ModuleList(blocks)
    self.drop_path = DropPath(cfg.drop_path)
    self.apply(self._init_weights)

  @staticmethod
  def _init_weights(module):
    if isinstance(module, nn.Linear):
      nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
      if module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
      nn.init.ones_(module.weight)
      nn.init.zeros_(module.bias)

  def forward(self, inputs, behaviors, mouse_id):
    outputs = inputs
    for block in self.blocks:
      if "b-mlp" in block:   # before the attention, added to every token (cls included)
        outputs = outputs + block["b-mlp"](behaviors, mouse_id)[:, None, :]
      outputs = outputs + self.drop_path(block["mha"](outputs))
      outputs = outputs + self.drop_path(block["mlp"](outputs))
    return outputs


class ViTCore(nn.Module):
  """Patch embedding, blocks, no final LayerNorm, cls dropped, "b (h w) c -> b c h w" with
  find_shape's (h, w) (§3.3). Regulariser: core_reg_scale * sum |theta| over all parameters."""

  def __init__(self, cfg: Config, image_shape, mouse_ids):
    super().__init__()
    self.register_buffer("reg_scale", torch.tensor(cfg.core_reg_scale))
    self.behavior_mode = cfg.behavior_mode
    self.patch_embedding = Image2Patches(
        image_shape, patch_size=cfg.patch_size, stride=cfg.patch_stride, emb_dim=cfg.emb_dim,
        dropout=cfg.p_dropout)
    self.transformer = Transformer(cfg, mouse_ids)
    h, w = find_shape(self.patch_embedding.num_patches)
    self.output_shape = (cfg.emb_dim, h, w)

  def regularizer(self):
    return self.reg_scale * sum(p.abs().sum() for p in self.parameters())

  def forward(self, inputs, mouse_id, behaviors, pupil_centers):
    if self.behavior_mode in (3, 4):   # [dilation, d dilation, speed, pupil x, pupil y] (§1)
      behaviors = torch.cat([behaviors, pupil_centers], dim=-1)
    outputs = self.patch_embedding(inputs)
    outputs = self.transformer(outputs, behaviors, mouse_id)
    outputs = outputs[:, 1:]
    b, _, c = outputs.shape
    _, h, w = self.output_shape
    return outputs.reshape(b, h, w, c).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# Core shifter (§5.1), Gaussian2d readout (§4), ELU+1 (§6).


class MLPShifter(nn.Module):
  """Per mouse: Linear(2 -> 5), tanh, Linear(5 -> 5), tanh, Linear(5 -> 2), tanh."""

  def __init__(self, reg_scale):
    super().__init__()
    self.register_buffer("reg_scale", torch.tensor(reg_scale))
    self.mlp = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                             nn.Linear(5, 2), nn.Tanh())

  def regularizer(self):
    return self.reg_scale * sum(p.abs().sum() for p in self.parameters())

  def forward(self, pupil_centers):
    return self.mlp(pupil_centers)


def source_grid(coordinates: np.ndarray, dim: int = 2) -> torch.Tensor:
  """§4: the first `dim` columns of cell_motor_coordinates, minus the column means, divided by
  the single largest |value| of the centred array (float32, as the original)."""
  xy = torch.as_tensor(np.asarray(coordinates)[:, :dim], dtype=torch.float32)
  xy = xy - xy.mean(dim=0, keepdim=True)
  return xy / xy.abs().max()


class Gaussian2d(nn.Module):
  """FullGaussian2d with the grid predictor (§4), one mouse.

  features (1, C, 1, N) = 1/C, sigma (1, N, 2, 2) ~ U(-0.1, 0.1), bias 0, mu from
  mu_transform(source_grid) = Linear(2 -> 30), ELU, Linear(30 -> 2), tanh.
  """

  def __init__(self, num_channels, coordinates, reg_scale, init_sigma=0.1):
    super().__init__()
    grid = source_grid(coordinates)
    num_neurons = grid.shape[0]
    self.num_neurons = num_neurons
    self.sigma = nn.Parameter(torch.empty(1, num_neurons, 2, 2).uniform_(-init_sigma, init_sigma))
    self.features = nn.Parameter(torch.full((1, num_channels, 1, num_neurons), 1.0 / num_channels))
    self.bias = nn.Parameter(torch.zeros(num_neurons))   # bias_mode 0
    self.register_buffer("reg_scale", torch.tensor(reg_scale))
    self.register_buffer("source_grid", grid)
    self.mu_transform = nn.Sequential(nn.Linear(grid.shape[1], 30), nn.ELU(), nn.Linear(30, 2),
                                      nn.Tanh())

  def regularizer(self):
    return self.reg_scale * self.features.abs().sum()   # features only (gamma_readout)

  def sample_grid(self, batch_size):
    """(B, N, 1, 2): training clamp(mu + sigma z, -1, 1), z ~ N(0, I) per image and neuron;
    evaluation clamp(mu, -1, 1). Component 0 is x (width), 1 is y (height)."""
    mu = self.mu_transform(self.source_grid).view(1, self.num_neurons, 1, 2)
    if self.training:
      z = torch.randn(batch_size, self.num_neurons, 1, 2, device=mu.device, dtype=mu.dtype)
      # (sigma z)_c = sum_d sigma[0, n, c, d] z[b, n, 0, d]
      return torch.clamp(torch.einsum("ancd,bnid->bnic", self.sigma, z) + mu, -1.0, 1.0)
    return torch.clamp(mu, -1.0, 1.0).expand(batch_size, -1, -1, -1)

  def forward(self, inputs, shifts=None):
    b, c = inputs.shape[:2]
    grid = self.sample_grid(b)
    if shifts is not None:   # after the clamp: positions may leave [-1, 1] (zero padding)
      grid = grid + shifts[:, None, None, :]
    samples = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=True)                        # (B, C, N, 1)
    outputs = (samples.squeeze(-1) * self.features.view(1, c, self.num_neurons)).sum(dim=1)
    return outputs + self.bias


class ELU1(nn.Module):
  def __init__(self):
    super().__init__()
    self.register_buffer("one", torch.tensor(1.0))

  def forward(self, inputs):
    return F.elu(inputs) + self.one


class V1T(nn.Module):
  """image_cropper, core, core_shifter (shift_mode 2), readouts, elu1: the original's module
  tree (§10). `mice`: {mouse id: cell_motor_coordinates (N, >=2)}, in training order."""

  def __init__(self, cfg: Config, mice, input_shape=(1, 36, 64)):
    super().__init__()
    self.cfg = cfg
    mouse_ids = list(mice)
    self.image_cropper = ImageCropper(input_shape, center_crop=cfg.center_crop,
                                      resize_image=cfg.resize_image, image_size=cfg.image_size)
    channels = input_shape[0]
    if cfg.resize_image:
      core_hw = tuple(cfg.image_size)
    else:
      core_hw = tuple(int(n * cfg.center_crop) for n in input_shape[1:])
    self.core = ViTCore(cfg, (channels,) + core_hw, mouse_ids)
    if cfg.shift_mode == 2:
      self.core_shifter = nn.ModuleDict(
          {m: MLPShifter(cfg.shifter_reg_scale) for m in mouse_ids})
    else:
      self.core_shifter = None
    self.readouts = nn.ModuleDict(
        {m: Gaussian2d(cfg.emb_dim, mice[m], cfg.readout_reg_scale) for m in mouse_ids})
    self.elu1 = ELU1()

  def regularizer(self, mouse_id):
    """R_m (§7): core + readout_m + shifter_m terms (each with its own reg_scale)."""
    reg = self.core.regularizer() + self.readouts[mouse_id].regularizer()
    if self.core_shifter is not None:
      reg = reg + self.core_shifter[mouse_id].regularizer()
    return reg

  def forward(self, inputs, mouse_id, behaviors, pupil_centers, activate=True):
    """(B, C, H, W) images of one mouse -> (prediction (B, N), cropped images, crop grid)."""
    images, grid = self.image_cropper(inputs)
    outputs = self.core(images, mouse_id, behaviors, pupil_centers)
    shifts = None if self.core_shifter is None else self.core_shifter[mouse_id](pupil_centers)
    outputs = self.readouts[mouse_id](outputs, shifts)
    if activate:
      outputs = self.elu1(outputs)
    return outputs, images, grid


# ---------------------------------------------------------------------------------------------
# Loss, objective, optimizer (§7, §8.1).


def poisson_loss(pred, target):
  """sum over trials and neurons of (p + eps) - (y + eps) log(p + eps)."""
  pred, target = pred + POISSON_EPS, target + POISSON_EPS
  return torch.sum(pred - target * torch.log(pred))


def objective(model: V1T, batch: dict, mouse_id: str, n_train: int):
  """J_m = Poisson loss * sqrt(N_train / B) (ds_scale) + R_m. Returns (J_m, loss, R_m)."""
  pred, _, _ = model(batch["image"], mouse_id, batch["behavior"], batch["pupil_center"])
  loss = poisson_loss(pred, batch["responses"])
  if model.cfg.ds_scale:
    loss = loss * math.sqrt(n_train / batch["image"].shape[0])
  reg = model.regularizer(mouse_id)
  return loss + reg, loss, reg


def make_optimizer(model: V1T):
  """AdamW(weight_decay=0) over the groups core, readouts, core shifter (§8.1)."""
  cfg = model.cfg
  groups = [{"params": model.core.parameters(), "name": "core"},
            {"params": model.readouts.parameters(), "name": "readouts"}]
  if model.core_shifter is not None:
    groups.append({"params": model.core_shifter.parameters(), "name": "core_shifter"})
  return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                           eps=cfg.adam_eps, weight_decay=0.0)


def train_step(model: V1T, optimizer, batch: dict, mouse_id: str, n_train: int) -> float:
  """One update from one mouse-batch: zero_grad, train-mode forward, backward, step."""
  model.train()
  optimizer.zero_grad()
  total, _, _ = objective(model, batch, mouse_id, n_train)
  total.backward()
  optimizer.step()
  return float(total.detach())


# ---------------------------------------------------------------------------------------------
# Parameter counts and the state_dict of §10.


def count(module) -> int:
  return sum(p.numel() for p in module.parameters()) if module is not None else 0


def count_parameters(model: V1T) -> dict:
  out = {"core": count(model.core),
         "readouts": {m: count(r) for m, r in model.readouts.items()},
         "shifters": {m: count(s) for m, s in (model.core_shifter or {}).items()}}
  out["total"] = out["core"] + sum(out["readouts"].values()) + sum(out["shifters"].values())
  return out


def spec_state_dict_shapes(cfg: Config, neurons: dict, input_shape) -> dict:
  """key -> shape of every tensor of §10 (HEAD naming) for this configuration."""
  d, h, m, p = cfg.emb_dim, cfg.num_heads, cfg.mlp_dim, cfg.patch_size
  c, height, width = input_shape
  rows, cols = ((n - p) // cfg.patch_stride + 1 for n in cfg.image_size)
  s = cfg.center_crop
  out = {"image_cropper.grid": (1, int(height * s), int(width * s), 2),
         "core.reg_scale": (),
         "core.patch_embedding.cls_token": (1, 1, d),
         "core.patch_embedding.pos_embedding": (rows * cols + 1, d),
         "core.patch_embedding.projection.2.weight": (d, c * p * p),
         "core.patch_embedding.projection.2.bias": (d,),
         "core.transformer.drop_path.keep_prop": (),
         "elu1.one": ()}
  for i in range(cfg.num_blocks):
    k = f"core.transformer.blocks.{i}"
    out.update({f"{k}.mha.scale": (), f"{k}.mha.layer_norm.weight": (d,),
                f"{k}.mha.layer_norm.bias": (d,), f"{k}.mha.to_qkv.weight": (3 * h * d, d),
                f"{k}.mha.projection.0.weight": (d, h * d), f"{k}.mha.projection.0.bias": (d,),
                f"{k}.mlp.model.0.weight": (d,), f"{k}.mlp.model.0.bias": (d,),
                f"{k}.mlp.model.1.weight": (m, d), f"{k}.mlp.model.1.bias": (m,),
                f"{k}.mlp.model.4.weight": (d, m), f"{k}.mlp.model.4.bias": (d,)})
    if cfg.behavior_dim:
      for key in (list(neurons) if cfg.behavior_mode == 4 else ["share"]):
        b = f"{k}.b-mlp.models.{key}"
        out.update({f"{b}.0.weight": (d // 2, cfg.behavior_dim), f"{b}.0.bias": (d // 2,),
                    f"{b}.3.weight": (d, d // 2), f"{b}.3.bias": (d,)})
  for mouse, n in neurons.items():
    if cfg.shift_mode == 2:
      k = f"core_shifter.{mouse}"
      out.update({f"{k}.reg_scale": (), f"{k}.mlp.0.weight": (5, 2), f"{k}.mlp.0.bias": (5,),
                  f"{k}.mlp.2.weight": (5, 5), f"{k}.mlp.2.bias": (5,),
                  f"{k}.mlp.4.weight": (2, 5), f"{k}.mlp.4.bias": (2,)})
    k = f"readouts.{mouse}"
    out.update({f"{k}.sigma": (1, n, 2, 2), f"{k}.features": (1, d, 1, n), f"{k}.bias": (n,),
                f"{k}.reg_scale": (), f"{k}.source_grid": (n, 2),
                f"{k}.mu_transform.0.weight": (30, 2), f"{k}.mu_transform.0.bias": (30,),
                f"{k}.mu_transform.2.weight": (2, 30), f"{k}.mu_transform.2.bias": (2,)})
  return out


def build(cfg: Config, neurons: dict, input_shape, seed: int = 0) -> V1T:
  """The model with random cortical coordinates (µm) per mouse, like the JAX bench's stand-ins."""
  rng = np.random.default_rng(seed)
  torch.manual_seed(seed)
  mice = {m: rng.uniform(-500, 500, (n, 3)).astype(np.float32) for m, n in neurons.items()}
  return V1T(cfg, mice, input_shape)


def default_counts() -> dict:
  """Parameter counts of the default 6-mouse Sensorium+ model, checked against §10.1."""
  cfg = Config()
  model = build(cfg, SENSORIUM_PLUS_NEURONS, (1, 36, 64))
  counts = count_parameters(model)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  expected = spec_state_dict_shapes(cfg, SENSORIUM_PLUS_NEURONS, (1, 36, 64))
  problems = []
  if shapes != expected:
    problems.append(f"state_dict differs from §10: missing {sorted(set(expected) - set(shapes))}"
                    f", unexpected {sorted(set(shapes) - set(expected))}, misshapen "
                    f"{[k for k in expected if k in shapes and shapes[k] != expected[k]]}")
  if counts["core"] != SPEC_CORE_PARAMS:
    problems.append(f"core {counts['core']:,} != {SPEC_CORE_PARAMS:,}")
  for mouse, n in SENSORIUM_PLUS_NEURONS.items():
    if counts["readouts"][mouse] != spec_readout_params(n):
      problems.append(f"readout {mouse} {counts['readouts'][mouse]:,} != "
                      f"{spec_readout_params(n):,}")
    if counts["shifters"][mouse] != SPEC_SHIFTER_PARAMS:
      problems.append(f"shifter {mouse} {counts['shifters'][mouse]} != {SPEC_SHIFTER_PARAMS}")
  if counts["total"] != SPEC_TOTAL_6_MICE:
    problems.append(f"total {counts['total']:,} != {SPEC_TOTAL_6_MICE:,}")
  spec = {"core": SPEC_CORE_PARAMS, "shifter_per_mouse": SPEC_SHIFTER_PARAMS,
          "readout_per_mouse": "160 N + 152", "total": SPEC_TOTAL_6_MICE}
  return {"counts": counts, "spec": spec, "problems": problems, "state_dict_keys": len(shapes)}


# ---------------------------------------------------------------------------------------------
# Measurement.


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def cpu_has(flag: str) -> bool | None:
  """Whether /proc/cpuinfo lists `flag` (e.g. avx512f); None where it cannot be read."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return flag in line.split(":", 1)[1].split()
  except OSError:
    pass
  return None


def synthetic_batch(batch_size: int, image_chw, num_neurons: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  arrays = {
      "image": rng.normal(size=(batch_size, *image_chw)),
      "behavior": np.abs(rng.normal(size=(batch_size, 3))),
      "pupil_center": rng.normal(size=(batch_size, 2)),
      "responses": rng.gamma(0.5, 1.0, size=(batch_size, num_neurons)),
  }
  return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in arrays.items()}


def _cpu_times():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime, r.ru_stime, r.ru_minflt


def measure(run, *, iters: int, warmup: int) -> dict:
  """Times `run(i)`: `warmup` untimed calls, then `iters` timed ones; peak RSS over all."""
  reset = reset_peak_rss()
  for i in range(warmup):
    run(i)
  times = []
  user0, sys0, faults0 = _cpu_times()
  for i in range(warmup, warmup + iters):
    t0 = time.perf_counter()
    run(i)
    times.append(time.perf_counter() - t0)
  user1, sys1, faults1 = _cpu_times()
  return {"times": times, "peak_host_gib": peak_rss_gib(), "peak_rss_reset": reset,
          "user_s": (user1 - user0) / iters, "sys_s": (sys1 - sys0) / iters,
          "page_faults": (faults1 - faults0) / iters}


def bench_forward(model, batch, mouse_id, n_train):
  model.eval()

  def run(i):
    del i
    with torch.no_grad():
      _, loss, _ = objective(model, batch, mouse_id, n_train)
    return float(loss)

  return run


def bench_train_step(model, optimizer, batch, mouse_id, n_train):
  def run(i):
    del i
    return train_step(model, optimizer, batch, mouse_id, n_train)

  return run


# ---------------------------------------------------------------------------------------------
# Check mode.


def check() -> dict:
  """Tiny shapes: shapes, finite loss, a train step that moves the stepped mouse's parameters
  (and only them), the §10 state_dict, and the default configuration's §10.1 counts."""
  cfg = Config(num_blocks=2, image_size=(16, 32))
  neurons = {"S1": 50, "A": 30}
  input_shape = (1, 16, 32)
  model = build(cfg, neurons, input_shape, seed=0)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert shapes == spec_state_dict_shapes(cfg, neurons, input_shape), "state_dict != §10"
  batch = synthetic_batch(2, input_shape, neurons["S1"], seed=0)
  model.eval()
  with torch.no_grad():
    pred, images, _ = model(batch["image"], "S1", batch["behavior"], batch["pupil_center"])
    pred2, _, _ = model(batch["image"], "S1", batch["behavior"], batch["pupil_center"])
  assert pred.shape == (2, 50), pred.shape
  assert bool((pred > 0).all()) and bool(torch.isfinite(pred).all())
  assert torch.equal(pred, pred2), "eval mode must be deterministic"
  assert torch.allclose(images, batch["image"]), "center_crop 1 at the core's size: identity"
  model.train()
  with torch.no_grad():
    t1, _, _ = model(batch["image"], "S1", batch["behavior"], batch["pupil_center"])
    t2, _, _ = model(batch["image"], "S1", batch["behavior"], batch["pupil_center"])
  assert not torch.equal(t1, t2), "train mode: dropout and readout sampling must be active"
  total, loss, reg = objective(model, batch, "S1", N_TRAIN)
  assert all(math.isfinite(float(x.detach())) for x in (total, loss, reg)), (total, loss, reg)
  before = {k: v.detach().clone() for k, v in model.named_parameters()}
  optimizer = make_optimizer(model)
  step_loss = train_step(model, optimizer, batch, "S1", N_TRAIN)
  assert math.isfinite(step_loss)
  changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
  stepped = {k for k in before if not k.startswith(("readouts.A.", "core_shifter.A."))}
  assert changed == stepped, (sorted(stepped - changed), sorted(changed - stepped))
  defaults = default_counts()
  assert not defaults["problems"], defaults["problems"]
  return {"check": "ok", "tiny_pred_shape": list(pred.shape), "tiny_loss": float(total.detach()),
          "params_changed": len(changed), "default_counts": defaults["counts"],
          "state_dict_keys_default_6_mice": defaults["state_dict_keys"]}


# ---------------------------------------------------------------------------------------------
# CLI.


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--neurons", default=str(SENSORIUM_PLUS_NEURONS["S1"]),
                 help="neurons per mouse, comma-separated; the readouts of every mouse are "
                      "built, step i uses mouse i mod K (default: S1 alone)")
  p.add_argument("--image_hw", default="36,64",
                 help="input image H,W (144,256: the raw size, cropped and resized in the model)")
  p.add_argument("--what", default="train_step,forward",
                 help="comma-separated, in order (train first, as v1t_jax.bench)")
  p.add_argument("--iters", type=int, default=5, help="timed calls (the median is reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
  p.add_argument("--malloc", choices=("glibc", "stock"), default="glibc",
                 help="glibc: mallopt keeps freed memory (v1t_jax/allocator.py); stock: defaults")
  p.add_argument("--n_train", type=int, default=N_TRAIN, help="train trials (ds_scale)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="Config override, e.g. num_blocks=2 (repeatable)")
  p.add_argument("--check", action="store_true", help="tiny-shape self-test, then exit")
  p.add_argument("--count_params", action="store_true",
                 help="parameter counts of the default config vs model_spec.md §10.1, then exit")
  return p.parse_args(argv)


def config_from(overrides) -> Config:
  fields = {f.name: f for f in dataclasses.fields(Config)}
  values = {}
  for item in overrides:
    name, sep, text = item.partition("=")
    if not sep or name not in fields:
      raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD in {sorted(fields)}")
    default = fields[name].default
    if isinstance(default, bool):
      values[name] = text.lower() in ("1", "true", "yes")
    elif isinstance(default, tuple):
      values[name] = tuple(int(x) for x in text.strip("()").split(","))
    else:
      values[name] = type(default)(text)
  return Config(**values)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  tuned = GLIBC_TUNED if GLIBC_TUNED is not None else False   # imported: mallopt not called
  torch.set_num_threads(args.threads or os.cpu_count())
  if args.count_params:
    result = default_counts()
    print(json.dumps(result, default=str), flush=True)
    return [result]
  if args.check:
    result = check()
    print(json.dumps(result), flush=True)
    return [result]
  load_avg = os.getloadavg()
  cfg = config_from(args.set)
  counts = [int(n) for n in args.neurons.split(",")]
  neurons = {(list(SENSORIUM_PLUS_NEURONS)[i] if i < 6 else f"M{i}"): n
             for i, n in enumerate(counts)}
  image_chw = (1,) + tuple(int(n) for n in args.image_hw.split(","))
  model = build(cfg, neurons, image_chw, seed=args.seed)
  params = count_parameters(model)
  optimizer = make_optimizer(model)
  mouse_ids = list(neurons)
  batches = {m: synthetic_batch(args.batch_size, image_chw, n, args.seed + i)
             for i, (m, n) in enumerate(neurons.items())}
  results = []
  for what in [w.strip() for w in args.what.split(",") if w.strip()]:
    if what not in ("forward", "train_step"):
      raise SystemExit(f"--what: forward and/or train_step, got {what!r}")

    def run(i, what=what):
      mouse = mouse_ids[i % len(mouse_ids)]
      if what == "forward":
        return bench_forward(model, batches[mouse], mouse, args.n_train)(i)
      return bench_train_step(model, optimizer, batches[mouse], mouse, args.n_train)(i)

    raw = measure(run, iters=args.iters, warmup=args.warmup)
    step_s = float(np.median(raw["times"]))
    rows, cols = ((n - cfg.patch_size) // cfg.patch_stride + 1 for n in cfg.image_size)
    flops = flops_by_part(   # v1t_jax.bench's formula (the grid predictor: 2 coordinates)
        patches=rows * cols, channels=image_chw[0], patch_size=cfg.patch_size,
        emb_dim=cfg.emb_dim, num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim,
        num_blocks=cfg.num_blocks, behavior_dim=cfg.behavior_dim, shifter=cfg.shift_mode == 2,
        n_max=max(counts), grid_predictor_dim=2, batch_size=args.batch_size)
    gflop = (3.0 if what == "train_step" else 1.0) * flops["total"] / 1e9
    result = {
        "what": what,
        "examples_per_s": args.batch_size / step_s,
        "step_s": step_s,
        "step_s_all": raw["times"],
        "gflop_per_example": gflop,
        "gflops": gflop * args.batch_size / step_s,
        "peak_host_gib": raw["peak_host_gib"],
        "peak_host_since_start": not raw["peak_rss_reset"],
        "user_s": raw["user_s"],
        "sys_s": raw["sys_s"],
        "page_faults": raw["page_faults"],
        "framework": "pytorch reference (scripts/bench_torch_reference.py)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "malloc": args.malloc,
        "allocator": allocator_in_use(),
        "glibc_tuned": tuned,
        "mallopt": ({"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}
                    if tuned else None),
        "load_avg": list(load_avg),
        "load_avg_1m": load_avg[0],
        "load_avg_1m_end": os.getloadavg()[0],
        "batch_size": args.batch_size,
        "mice": len(counts),
        "mice_per_step": 1,
        "examples_per_step": args.batch_size,
        "neurons": counts,
        "image_chw": list(image_chw),
        "core_input_hw": list(cfg.image_size),
        "dtype": "float32",
        "params": params,
        "overrides": args.set,
        "iters": args.iters,
        "warmup": args.warmup,
        "cpu": cpu_model(),
        "avx512f": cpu_has("avx512f"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
    }
    results.append(result)
    print(json.dumps(result), flush=True)
  return results


if __name__ == "__main__":
  main()
