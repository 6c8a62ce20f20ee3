"""The input pipeline's batches equal a NumPy computation from the raw zip files."""

import io
import os
import zipfile

import numpy as np
import pytest
from image_reference import grid_sample_crop_then_resize

from configs import synthetic
from v1t_jax import dataset_meta, image_stage
from v1t_jax import input_pipeline as ip


def data_cfg(**overrides):
  cfg = synthetic.get_config("tiny").data
  cfg.batch_size, cfg.eval_batch_size = 4, 8
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


class RawMouse:
  """A mouse read straight from its zip, normalised with NumPy as the original does."""

  def __init__(self, path):
    zf = zipfile.ZipFile(path)
    root = os.path.basename(path)[:-4]
    self.load = lambda rel: np.load(io.BytesIO(zf.read(f"{root}/{rel}")), allow_pickle=False)
    self.tiers = self.load("meta/trials/tiers.npy")
    self.n = self.load("meta/neurons/unit_ids.npy").size

  def stat(self, field, stat):
    return self.load(f"meta/statistics/{field}/all/{stat}.npy").astype(np.float64)

  def normalised(self, i, n_max, center_crop=1.0, out_hw=(36, 64)):
    image = (self.load(f"data/images/{i}.npy") - self.stat("images", "mean")) / self.stat(
        "images", "std")
    if center_crop == 1.0 and out_hw == (36, 64):
      image = image_stage.block_mean_reference(image)   # the spec's closed form
    else:
      image = grid_sample_crop_then_resize(image, center_crop, out_hw)   # pixel by pixel
    s = self.stat("responses", "std")
    threshold = 0.01 * s.mean()
    precision = np.where(s > threshold, 1 / s, 1 / threshold)
    responses = np.zeros(n_max)
    responses[: self.n] = self.load(f"data/responses/{i}.npy") * precision
    bstd, pstd = self.stat("behavior", "std"), self.stat("pupil_center", "std")
    behavior = self.load(f"data/behavior/{i}.npy") / np.where(bstd > 0, bstd, np.inf)
    pupil = (self.load(f"data/pupil_center/{i}.npy") - self.stat("pupil_center", "mean")) / np.where(
        pstd > 0, pstd, np.inf)
    return {"image": image.transpose(1, 2, 0), "responses": responses, "behavior": behavior,
            "pupil_center": pupil}


@pytest.fixture(scope="module")
def mice(tiny_data_dir):
  return dataset_meta.resolve_mice(tiny_data_dir)


def check_rows(batches, raw_mice, n_max, **kw):
  seen = [[] for _ in raw_mice]
  for b in batches:
    for m, raw in enumerate(raw_mice):
      for j in np.flatnonzero(b["valid"][m]):
        i = b["trial"][m, j]
        seen[m].append(i)
        want = raw.normalised(i, n_max, **kw)
        for key, value in want.items():
          np.testing.assert_allclose(b[key][m, j], value, rtol=2e-5, atol=2e-5, err_msg=key)
      pad = ~b["valid"][m]
      assert np.all(b["trial"][m][pad] == -1) and np.all(b["responses"][m][pad] == 0)
  return seen


def test_eval_batches_equal_numpy_in_file_order(tiny_zips, mice):
  raw = [RawMouse(p) for p in tiny_zips]
  n_max = max(r.n for r in raw)
  ds, num_batches = ip.eval_dataset(mice, "validation", data_cfg(), process_index=0,
                                    process_count=1)
  batches = list(ip.as_numpy(ds))
  assert len(batches) == num_batches == 2   # 12 validation trials, batches of 8
  b = batches[0]
  assert b["image"].shape == (3, 8, 36, 64, 1) and b["responses"].shape == (3, 8, n_max)
  seen = check_rows(batches, raw, n_max)
  for m, r in enumerate(raw):   # every trial exactly once, in file order
    assert seen[m] == list(np.flatnonzero(r.tiers == "validation"))
  # Padded neurons of the smaller mice are zero.
  assert np.all(b["responses"][2][:, raw[2].n:] == 0)


def test_stimulus_only_mouse_gets_zero_behaviour(mice):
  ds, _ = ip.eval_dataset(mice, "train", data_cfg(), process_index=0, process_count=1)
  b = next(iter(ip.as_numpy(ds)))
  assert np.all(b["behavior"][0] == 0) and np.all(b["pupil_center"][0] == 0)
  assert np.all(np.isfinite(b["behavior"])) and b["behavior"][1].std() > 0


def test_center_crop_path(tiny_zips, mice):
  raw = [RawMouse(p) for p in tiny_zips]
  ds, _ = ip.eval_dataset(mice, "test", data_cfg(center_crop=0.5), process_index=0,
                          process_count=1)
  batches = list(ip.as_numpy(ds))
  assert batches[0]["image"].shape[2:4] == (36, 64)
  check_rows(batches[:1], raw, max(r.n for r in raw), center_crop=0.5)


def test_processes_partition_each_tier(mice):
  per_process = []
  for pi in range(3):
    ds, n = ip.eval_dataset(mice, "test", data_cfg(), process_index=pi, process_count=3)
    batches = list(ip.as_numpy(ds))
    assert len(batches) == n
    per_process.append([sorted(t for b in batches for t in b["trial"][m][b["valid"][m]])
                        for m in range(len(mice))])
  for m, meta in enumerate(mice):
    trials = sorted(t for p in per_process for t in p[m])
    want = sorted(np.flatnonzero(meta.trial_array("tiers") == "test"))
    assert trials == want   # each test trial exactly once across processes


def test_final_test_tier_only_in_competition_mice(mice):
  ds, n = ip.eval_dataset(mice, "final_test", data_cfg(), process_index=0, process_count=1)
  batches = list(ip.as_numpy(ds))
  valid = np.sum([b["valid"].sum(1) for b in batches], axis=0)
  assert valid[0] == mice[0].tier_size("final_test") > 0 and valid[2] == 0


def test_train_batches_shuffle_each_mouse_independently(tiny_zips, mice):
  cfg = data_cfg()
  assert ip.steps_per_epoch(mice, cfg.batch_size) == 10   # ceil(40 / 4)
  it = iter(ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1)))
  batches = [next(it) for _ in range(20)]
  b = batches[0]
  assert b["image"].shape == (3, 4, 36, 64, 1) and b["valid"].all()
  trials = np.stack([x["trial"] for x in batches], axis=1).reshape(3, -1)   # [M, 80]
  for m, meta in enumerate(mice):
    train = set(np.flatnonzero(meta.trial_array("tiers") == "train"))
    assert set(trials[m]) == train                  # two epochs cover the whole train tier
    assert sorted(trials[m][:40]) == sorted(train)  # the first 40 draws are one full pass
  assert not np.array_equal(trials[0][:40], trials[0][40:])   # reshuffled each pass
  raw = [RawMouse(p) for p in tiny_zips]
  check_rows(batches[:2], raw, max(r.n for r in raw))
  again = next(iter(ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1))))
  np.testing.assert_array_equal(again["trial"], b["trial"])   # deterministic given the seed


def test_limit_data(mice):
  cfg = data_cfg(limit_data=8)
  assert ip.steps_per_epoch(mice, 4, limit_data=8) == 2
  it = iter(ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1)))
  trials = np.concatenate([next(it)["trial"] for _ in range(6)], axis=1)
  assert all(len(set(trials[m])) == 8 for m in range(3))


def test_unknown_mouse_is_a_clear_error(tiny_data_dir):
  with pytest.raises(ValueError, match="mouse 'A' is not in"):
    dataset_meta.resolve_mice(tiny_data_dir, ["A"])
  assert [m.name for m in dataset_meta.resolve_mice(tiny_data_dir, ["90002-2-3"])] == ["90002-2-3"]


def test_franke_colour_mice(tmp_path):
  from configs import franke
  from data_prep import convert, synthesize
  zips = synthesize.synthesize(str(tmp_path / "zips"), "tiny", seed=0, trials=12, color=True)
  convert.convert(zips, str(tmp_path / "tfds"))
  mice = dataset_meta.resolve_mice(str(tmp_path / "tfds"))
  for gray, channels in ((False, 2), (True, 1)):
    cfg = franke.get_config("gray" if gray else None).data
    cfg.batch_size, cfg.eval_batch_size = 4, 8
    ds, _ = ip.eval_dataset(mice, "test", cfg, process_index=0, process_count=1)
    b = next(iter(ip.as_numpy(ds)))
    assert b["image"].shape == (3, 8, 36, 64, channels)   # no resize for 36x64 images
  raw = RawMouse(zips[0])
  i = b["trial"][0, 0]
  image = (raw.load(f"data/images/{i}.npy") - raw.stat("images", "mean")) / raw.stat("images", "std")
  np.testing.assert_allclose(b["image"][0, 0, :, :, 0], image.mean(0), rtol=1e-5, atol=1e-5)
