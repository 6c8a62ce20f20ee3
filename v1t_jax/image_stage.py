"""The original's image stage (center crop, then resize) as two separable matrices.

V1T crops with a nearest-neighbour `grid_sample` (align_corners=True) on the grid
x = linspace(-s, s, floor(256 s)), y = linspace(-s, s, floor(144 s)) and then resizes with
`torchvision.transforms.Resize(antialias=False)`, i.e. bilinear with align_corners=False
(`model_spec.md` §2.4). Both steps act on rows and columns independently, so the whole stage is
`out = A_y @ image @ A_x^T` per channel. For 144x256 -> 36x64 the resize rows hold two weights of
0.5, which is exactly the 2x2 block mean `in[4i+1:4i+3, 4j+1:4j+3]` of the spec.

The matrices are plain NumPy so the TF input pipeline and the JAX model share one definition
(no TensorFlow or JAX import here).
"""

from __future__ import annotations

import numpy as np


def crop_indices(size: int, center_crop: float) -> np.ndarray:
  """Source index of every output pixel of the original's nearest-neighbour center crop."""
  if not 0.0 < center_crop <= 1.0:
    raise ValueError(f"center_crop must be in (0, 1], got {center_crop}")
  n = int(size * center_crop)  # Python int() floors, as the original's int(256 * s)
  grid = np.linspace(-center_crop, center_crop, n, dtype=np.float64)
  src = (grid + 1.0) / 2.0 * (size - 1)  # align_corners=True unnormalisation
  return np.rint(src).astype(np.int64)  # grid_sample "nearest" rounds half to even, like rint


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of PyTorch bilinear resize with align_corners=False."""
  scale = in_size / out_size
  mat = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = max((i + 0.5) * scale - 0.5, 0.0)  # PyTorch clamps negative sources to 0 (linear mode)
    i0 = int(src)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    w1 = src - i0
    mat[i, i0] += 1.0 - w1
    mat[i, i1] += w1
  return mat


def axis_matrix(size: int, center_crop: float, out_size: int | None) -> np.ndarray:
  """Crop-then-resize along one axis as an [out, size] float32 matrix."""
  idx = crop_indices(size, center_crop)
  crop = np.zeros((idx.size, size), np.float64)
  crop[np.arange(idx.size), idx] = 1.0
  if out_size is None or out_size == idx.size:
    return crop.astype(np.float32)
  return (bilinear_matrix(idx.size, out_size) @ crop).astype(np.float32)


def crop_resize_matrices(
    in_hw: tuple[int, int], center_crop: float = 1.0, out_hw: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(A_y [out_h, H], A_x [out_w, W]) with out = A_y @ img @ A_x^T; out_hw None = crop only."""
  out_h, out_w = out_hw if out_hw is not None else (None, None)
  return axis_matrix(in_hw[0], center_crop, out_h), axis_matrix(in_hw[1], center_crop, out_w)


def output_hw(in_hw: tuple[int, int], center_crop: float, out_hw: tuple[int, int] | None):
  """Spatial size after the stage."""
  if out_hw is not None:
    return tuple(out_hw)
  return int(in_hw[0] * center_crop), int(in_hw[1] * center_crop)


def block_mean_reference(images: np.ndarray) -> np.ndarray:
  """The spec's closed form for 144x256 -> 36x64 on [..., H, W]: mean of in[4i+1:4i+3, 4j+1:4j+3]."""
  h, w = images.shape[-2:]
  x = images.reshape(images.shape[:-2] + (h // 4, 4, w // 4, 4))
  return x[..., 1:3, :, 1:3].mean(axis=(-3, -1))
