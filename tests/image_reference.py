"""The original's image stage computed directly, pixel by pixel, from model_spec.md §2.4: an
independent reference for image_stage's separable matrices (tests only)."""

import numpy as np


def grid_sample_crop_then_resize(image_CxHxW: np.ndarray, center_crop: float, out_hw):
  """F.grid_sample(mode="nearest", align_corners=True) on the grid linspace(-s, s, floor(W s)) x
  linspace(-s, s, floor(H s)), then torchvision Resize(out_hw, antialias=False): bilinear with
  align_corners=False, negative source coordinates clamped to 0 (out_hw None: no resize)."""
  channels, height, width = image_CxHxW.shape
  crop_h, crop_w = int(height * center_crop), int(width * center_crop)
  cropped = np.empty((channels, crop_h, crop_w))
  for i, gy in enumerate(np.linspace(-center_crop, center_crop, crop_h)):
    for j, gx in enumerate(np.linspace(-center_crop, center_crop, crop_w)):
      # nearest: round half to even (nearbyint) of the align_corners=True pixel coordinate
      y = int(np.rint((gy + 1) / 2 * (height - 1)))
      x = int(np.rint((gx + 1) / 2 * (width - 1)))
      cropped[:, i, j] = image_CxHxW[:, y, x]
  if out_hw is None:
    return cropped
  out_h, out_w = out_hw
  out = np.empty((channels, out_h, out_w))
  for i in range(out_h):
    sy = max((i + 0.5) * crop_h / out_h - 0.5, 0.0)
    y0 = int(np.floor(sy))
    y1, wy = min(y0 + 1, crop_h - 1), sy - y0
    for j in range(out_w):
      sx = max((j + 0.5) * crop_w / out_w - 0.5, 0.0)
      x0 = int(np.floor(sx))
      x1, wx = min(x0 + 1, crop_w - 1), sx - x0
      out[:, i, j] = ((1 - wy) * ((1 - wx) * cropped[:, y0, x0] + wx * cropped[:, y0, x1])
                      + wy * ((1 - wx) * cropped[:, y1, x0] + wx * cropped[:, y1, x1]))
  return out
