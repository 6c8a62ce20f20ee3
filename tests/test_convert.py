"""Conversion to TFRecord shards: lossless, tolerant, strict, idempotent and atomic."""

import io
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import convert
from data_prep.sensorium_source import SourceError
from v1t_jax import dataset_meta


def zip_arrays(path):
  """Every .npy of a zip by its path below the top-level folder (independent of the converter)."""
  zf = zipfile.ZipFile(path)
  root = os.path.basename(path)[:-4] + "/"
  return {n[len(root):]: np.load(io.BytesIO(zf.read(n)), allow_pickle=False)
          for n in zf.namelist() if n.endswith(".npy")}


def extract(zip_path, dest):
  zipfile.ZipFile(zip_path).extractall(dest)
  return os.path.join(dest, os.path.basename(zip_path)[:-4])


def test_round_trip_is_exact(tiny_zips, tiny_data_dir):
  for path in tiny_zips:
    raw = zip_arrays(path)
    tiers = raw["meta/trials/tiers.npy"]
    key = os.path.basename(path)[len("static"):].split("-GrayImageNet")[0]
    mdir = dataset_meta.mouse_dir(tiny_data_dir, key)
    builder = tfds.builder_from_directory(mdir)   # tfds's own decoding, not our fast parser
    assert builder.info.features["image"].np_dtype == np.uint8   # integer grey levels -> uint8
    for tier in np.unique(tiers):
      rows = list(tfds.as_numpy(builder.as_dataset(split=tier)))
      files = np.flatnonzero(tiers == tier)
      assert [r["trial"] for r in rows] == list(files)            # file order
      for r in rows:
        i = r["trial"]
        np.testing.assert_array_equal(r["image"], raw[f"data/images/{i}.npy"])
        for f in ("responses", "behavior", "pupil_center"):
          src = raw[f"data/{f}/{i}.npy"]
          assert r[f].dtype == src.dtype and np.array_equal(r[f], src), f
        assert r["image_id"] == raw["meta/trials/frame_image_id.npy"][i]
        assert r["trial_idx"].decode() == str(raw["meta/trials/trial_idx.npy"][i])
    meta = dataset_meta.load_mouse_dir(mdir)
    for rel, a in raw.items():
      if rel.startswith("meta/"):
        stored = meta.arrays[rel[len("meta/"):-len(".npy")]]
        assert stored.dtype == a.dtype and np.array_equal(stored, a), rel
    assert meta.info["source_name"] == os.path.basename(path)
    assert meta.info["tiers"] == {t: int(np.sum(tiers == t)) for t in np.unique(tiers)}
    assert meta.info["image_shape"] == [1, 144, 256]


def test_folder_source_equals_zip_source(tiny_zips, tiny_data_dir, tmp_path):
  folder = extract(tiny_zips[2], tmp_path / "src")
  out = tmp_path / "tfds"
  (r,) = convert.convert([folder], str(out))
  a = dataset_meta.load_mouse_dir(r.path)
  b = dataset_meta.load_mouse_dir(dataset_meta.mouse_dir(tiny_data_dir, r.data_key))
  assert a.info["num_trials"] == b.info["num_trials"]
  assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in b.arrays)
  ra = list(tfds.as_numpy(tfds.builder_from_directory(a.path).as_dataset(split="train")))
  rb = list(tfds.as_numpy(tfds.builder_from_directory(b.path).as_dataset(split="train")))
  assert all(np.array_equal(x["responses"], y["responses"]) for x, y in zip(ra, rb))


def test_non_integer_images_stay_float_and_other_dtypes(tiny_zips, tmp_path):
  folder = extract(tiny_zips[2], tmp_path / "src")
  n = len(os.listdir(os.path.join(folder, "data/images")))
  for i in range(n):   # float64 images with fractions, float64 responses, int behaviour
    p = os.path.join(folder, f"data/images/{i}.npy")
    np.save(p, np.load(p).astype(np.float64) + 0.25)
    p = os.path.join(folder, f"data/responses/{i}.npy")
    np.save(p, np.load(p).astype(np.float64))
  (r,) = convert.convert([folder], str(tmp_path / "tfds"))
  features = tfds.builder_from_directory(r.path).info.features
  assert features["image"].np_dtype == np.float64
  assert features["responses"].np_dtype == np.float64
  row = next(iter(tfds.as_numpy(tfds.builder_from_directory(r.path).as_dataset(split="test"))))
  np.testing.assert_array_equal(row["image"], np.load(os.path.join(folder, f"data/images/{row['trial']}.npy")))


@pytest.mark.parametrize("values, compact", [
    ([0.0, 255.0, 3.0], True), ([0.0, 256.0], False), ([-1.0, 2.0], False), ([1.5, 2.0], False),
    ([1e10, 2.0], False), ([-256.0, 1.0], False), ([3, 4], True), ([300, 4], False)])
def test_images_become_uint8_only_when_lossless(values, compact):
  from data_prep.sensorium_source import lossless_uint8
  a = np.array(values)
  out = lossless_uint8(a)
  assert (out is not None) == compact
  if compact:
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)


def test_tolerates_optional_and_unknown_files(tiny_zips, tmp_path):
  folder = extract(tiny_zips[2], tmp_path / "src")
  shutil.rmtree(os.path.join(folder, "meta/statistics/images/stimulus_Frame"))
  os.remove(os.path.join(folder, "meta/trials/trial_idx.npy"))
  np.save(os.path.join(folder, "meta/trials/frame_last_flip.npy"),
          np.arange(len(os.listdir(os.path.join(folder, "data/images")))))
  (r,) = convert.convert([folder], str(tmp_path / "tfds"))
  meta = dataset_meta.load_mouse_dir(r.path)
  assert "trials/frame_last_flip" in meta.arrays
  assert meta.info["statistics_sources"]["images"] == ["all"]


def _assert_no_dataset(data_dir):
  root = os.path.join(data_dir, dataset_meta.BUILDER_NAME)
  leftovers = [os.path.join(d, f) for d, subdirs, files in os.walk(root) for f in subdirs + files]
  assert dataset_meta.available_mice(data_dir) == [] and not any(
      "incomplete" in p for p in leftovers)


def _break(kind, zip_path, tmp_path):
  if kind == "truncated":
    data = open(zip_path, "rb").read()
    bad = tmp_path / os.path.basename(zip_path)
    bad.write_bytes(data[: len(data) // 2])
    return str(bad), "not a readable zip"
  folder = extract(zip_path, tmp_path / "src")
  if kind == "missing":
    os.remove(os.path.join(folder, "meta/neurons/cell_motor_coordinates.npy"))
    return folder, "cell_motor_coordinates.npy"
  if kind == "counts":
    os.remove(os.path.join(folder, "data/behavior/7.npy"))
    return folder, "data/behavior/"
  if kind == "nan":
    p = os.path.join(folder, "data/responses/5.npy")
    a = np.load(p)
    a[3] = np.nan
    np.save(p, a)
    return folder, "data/responses/5.npy contains NaN"
  if kind == "shape":
    np.save(os.path.join(folder, "data/images/9.npy"), np.zeros((1, 36, 64), np.float32))
    return folder, r"data/images/9.npy has shape \(1, 36, 64\); expected \(1, 144, 256\)"
  if kind == "neurons":
    p = os.path.join(folder, "meta/neurons/unit_ids.npy")
    np.save(p, np.load(p)[:-1])
    return folder, r"meta/neurons/\w+\.npy has shape .*one row per neuron"
  raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "missing", "counts", "nan", "shape", "neurons"])
def test_bad_input_gives_clear_error_and_no_dataset(kind, tiny_zips, tmp_path):
  src, message = _break(kind, tiny_zips[2], tmp_path)
  out = str(tmp_path / "tfds")
  with pytest.raises(SourceError, match=message):
    convert.convert([src], out)
  _assert_no_dataset(out)


def test_rerun_is_a_noop(tiny_zips, tiny_data_dir):
  before = {}
  for d, _, files in os.walk(tiny_data_dir):
    for f in files:
      p = os.path.join(d, f)
      before[p] = os.stat(p).st_mtime_ns
  results = convert.convert(tiny_zips, tiny_data_dir)
  assert all(r.skipped for r in results)
  after = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
           for d, _, files in os.walk(tiny_data_dir) for f in files}
  assert after == before


def test_other_source_needs_overwrite_and_leftovers_are_cleaned(tiny_zips, tmp_path):
  out = str(tmp_path / "tfds")
  (first,) = convert.convert([tiny_zips[2]], out)
  folder = extract(tiny_zips[2], tmp_path / "src")
  p = os.path.join(folder, "data/responses/0.npy")
  np.save(p, np.load(p) * 2)
  with pytest.raises(SourceError, match="--overwrite"):
    convert.convert([folder], out)
  stale = os.path.join(os.path.dirname(first.path), "incomplete.ABC123_1.0.0")
  os.makedirs(stale)
  (second,) = convert.convert([folder], out, overwrite=True)
  assert not second.skipped and not os.path.exists(stale)
  meta = dataset_meta.load_mouse_dir(second.path)
  assert meta.info["source_name"] == os.path.basename(folder)


def test_expand_folder_of_zips(tiny_zips):
  assert convert.expand_sources([os.path.dirname(tiny_zips[0])]) == sorted(tiny_zips)


def test_cli_reports_error_and_exit_code(tiny_zips, tmp_path):
  src, _ = _break("nan", tiny_zips[2], tmp_path)
  proc = subprocess.run([sys.executable, "-m", "data_prep.convert", f"--src={src}",
                         f"--data_dir={tmp_path / 'tfds'}"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 1
  assert "data/responses/5.npy contains NaN" in proc.stderr


def test_gather_src_joins_space_separated_paths():
  argv = ["convert", "--overwrite", "--src", "a.zip", "b.zip", "--data_dir", "D", "stray"]
  assert convert.gather_src(argv) == ["convert", "--overwrite", "--src=a.zip,b.zip",
                                      "--data_dir", "D", "stray"]
  assert convert.gather_src(["convert", "--src=a,b", "c", "--data_dir=D"]) == [
      "convert", "--src=a,b,c", "--data_dir=D"]
  assert convert.gather_src(["convert", "x", "--src", "a"]) == ["convert", "x", "--src=a"]


def test_stray_argument_is_a_usage_error():
  from absl import app
  with pytest.raises(app.UsageError, match="'stray'"):
    convert.main(["convert", "stray"])


def test_quoted_glob_is_expanded(tiny_zips):
  pattern = os.path.join(os.path.dirname(tiny_zips[0]), "static*.zip")
  assert convert.expand_sources([pattern]) == sorted(tiny_zips)
  with pytest.raises(SourceError, match="no file or folder matches"):
    convert.expand_sources([pattern + "x*"])


def test_cli_src_takes_shell_expanded_glob(tiny_zips, tiny_data_dir, tmp_path):
  # As after `--src dir/*.zip`: space-separated paths (one pair comma-separated); all three
  # mice are found (already converted, so skipped: nothing is written).
  proc = subprocess.run([sys.executable, "-m", "data_prep.convert", "--src", tiny_zips[0],
                         f"{tiny_zips[1]},{tiny_zips[2]}", "--data_dir", tiny_data_dir],
                        capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "3 mice found: 0 converted, 3 skipped" in proc.stdout
  proc = subprocess.run([sys.executable, "-m", "data_prep.convert", f"--data_dir={tmp_path}",
                         "stray", "--src", tiny_zips[0]], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 1 and "'stray'" in proc.stderr and not os.listdir(tmp_path)


def test_local_conversion_prints_one_line_per_mouse(tiny_zips, tmp_path, capfd, caplog):
  import logging
  caplog.set_level(logging.INFO, logger="absl")
  convert.convert([tiny_zips[2]], str(tmp_path))
  out, err = capfd.readouterr()
  lines = out.splitlines()
  assert len(lines) == 2, out
  assert lines[0].startswith("[1/1] 90003-4-5: 70 trials x 17 neurons from static90003-4-5")
  assert lines[1] == f"1 mouse found: 1 converted, 0 skipped (already converted) -> {tmp_path}"
  text = out + err + caplog.text
  assert "ownload" not in text and "custom data configuration" not in text, text
  convert.convert([tiny_zips[2]], str(tmp_path))   # a rerun: one line, the mouse is skipped
  assert capfd.readouterr().out.splitlines()[0] == (
      "[1/1] 90003-4-5: already converted from this source, skipped")


def _changed_source(zip_path, tmp_path):
  folder = extract(zip_path, tmp_path / "src")
  p = os.path.join(folder, "data/responses/0.npy")
  np.save(p, np.load(p) * 2)
  return folder


def test_overwrite_keeps_the_old_mouse_until_the_new_one_is_complete(tiny_zips, tmp_path,
                                                                     monkeypatch):
  out = str(tmp_path / "tfds")
  (first,) = convert.convert([tiny_zips[2]], out)
  folder = _changed_source(tiny_zips[2], tmp_path)

  def die_midway(self, tier):   # the new mouse's writer fails after its first split
    if tier != "train":
      raise KeyboardInterrupt("killed")
    yield from original(self, tier)

  original = convert.SensoriumMouse._generate_examples
  monkeypatch.setattr(convert.SensoriumMouse, "_generate_examples", die_midway)
  with pytest.raises(KeyboardInterrupt):
    convert.convert([folder], out, overwrite=True)
  meta = dataset_meta.load_mouse_dir(first.path)   # the old mouse, whole
  assert meta.info["source_name"] == os.path.basename(tiny_zips[2])
  assert sorted(os.listdir(os.path.dirname(first.path))) == ["1.0.0"]   # no leftovers
  monkeypatch.undo()

  # Killed between the two renames: the next run puts the old mouse back.
  os.rename(first.path, first.path + ".old")
  assert dataset_meta.available_mice(out) == []
  (again,) = convert.convert([tiny_zips[2]], out)
  assert again.skipped and sorted(os.listdir(os.path.dirname(first.path))) == ["1.0.0"]

  (second,) = convert.convert([folder], out, overwrite=True)
  assert not second.skipped and second.path == first.path
  assert sorted(os.listdir(os.path.dirname(first.path))) == ["1.0.0"]
  builder = tfds.builder_from_directory(second.path)   # tfds reads the swapped-in folder
  row = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
  np.testing.assert_array_equal(
      row["responses"], np.load(os.path.join(folder, f"data/responses/{row['trial']}.npy")))
  assert dataset_meta.load_mouse_dir(second.path).info["source_name"] == os.path.basename(folder)


def test_read_only_data_dir_is_one_clear_error(tiny_zips, tmp_path, monkeypatch):
  from data_prep import prepare
  out = tmp_path / "read_only"
  out.mkdir()
  out.chmod(0o555)
  if os.geteuid() == 0:   # root writes anyway: make the write itself fail as it would
    def refuse(**kwargs):
      raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(prepare.tempfile, "mkstemp", refuse)
  with pytest.raises(prepare.DataDirError,
                     match=rf"^--data_dir={out}: cannot write in this folder \(Permission denied\)$"):
    convert.convert([tiny_zips[2]], str(out))
  out.chmod(0o755)
  assert os.listdir(out) == []


def test_cli_data_dir_that_cannot_exist_is_one_line(tiny_zips, tmp_path):
  (tmp_path / "a_file").write_text("")
  bad = tmp_path / "a_file" / "tfds"
  proc = subprocess.run([sys.executable, "-m", "data_prep.convert", f"--src={tiny_zips[2]}",
                         f"--data_dir={bad}"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 1
  assert proc.stderr == f"error: --data_dir={bad}: cannot create this folder (Not a directory)\n"
