"""The synthetic zips have the exact published layout (sensorium_format.md §2-§4, §9)."""

import hashlib
import io
import json
import os
import re
import zipfile

import numpy as np
import pytest

from data_prep import synthesize

STATS = ("mean", "std", "min", "max", "median")


def load(zf: zipfile.ZipFile, root: str, rel: str) -> np.ndarray:
  return np.load(io.BytesIO(zf.read(f"{root}/{rel}")), allow_pickle=False)


def open_zip(path):
  zf = zipfile.ZipFile(path)
  return zf, os.path.basename(path)[:-4]


def test_names_and_single_top_level_folder(tiny_zips):
  assert len(tiny_zips) == 3
  for path in tiny_zips:
    name = os.path.basename(path)
    assert re.fullmatch(r"static\d+-\d+-\d+-GrayImageNet-[0-9a-f]{32}\.zip", name), name
    zf, root = open_zip(path)
    assert {n.split("/")[0] for n in zf.namelist()} == {root}
    assert json.loads(zf.read(f"{root}/config.json")) == {"links": {}}
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist() if i.file_size)


def test_every_file_dtype_and_shape(tiny_zips):
  for path in tiny_zips:
    zf, root = open_zip(path)
    names = set(zf.namelist())
    neurons = load(zf, root, "meta/neurons/unit_ids.npy")
    n = neurons.shape[0]
    tiers = load(zf, root, "meta/trials/tiers.npy")
    t = tiers.shape[0]
    # data/: exactly 0..N-1 in every folder, nothing else.
    for field, shape in (("images", (1, 144, 256)), ("responses", (n,)), ("behavior", (3,)),
                         ("pupil_center", (2,))):
      files = {x for x in names if x.startswith(f"{root}/data/{field}/") and not x.endswith("/")}
      assert files == {f"{root}/data/{field}/{i}.npy" for i in range(t)}
      for i in (0, t - 1):
        a = load(zf, root, f"data/{field}/{i}.npy")
        assert a.shape == shape and a.dtype == np.float32, (field, a.shape, a.dtype)
    image = load(zf, root, "data/images/0.npy")
    assert image.min() >= 0 and image.max() <= 255 and np.all(image == np.round(image))
    # meta/neurons
    assert neurons.dtype.kind == "i" and neurons[0] >= 1 and np.all(np.diff(neurons) > 0)
    coords = load(zf, root, "meta/neurons/cell_motor_coordinates.npy")
    assert coords.shape == (n, 3) and coords.dtype == np.float32
    assert len(np.unique(coords[:, 2])) <= 4          # a few imaging planes
    assert set(load(zf, root, "meta/neurons/area.npy")) == {"V1"}
    assert set(load(zf, root, "meta/neurons/layer.npy")) == {"L2/3"}
    for f in ("animal_ids", "sessions", "scan_idx"):
      a = load(zf, root, f"meta/neurons/{f}.npy")
      assert a.shape == (n,) and len(np.unique(a)) == 1
    # meta/trials
    assert tiers.dtype.kind == "U" and set(tiers) <= {"train", "validation", "test", "final_test"}
    for f in ("frame_image_id", "frame_image_class", "frame_trial_ts", "trial_idx"):
      assert load(zf, root, f"meta/trials/{f}.npy").shape == (t,), f
    assert load(zf, root, "meta/trials/frame_image_id.npy").dtype == np.int64
    # Whole seconds, as the real files and the original's parser (no ".800" fraction).
    stamps = load(zf, root, "meta/trials/frame_trial_ts.npy")
    assert all(re.fullmatch(r"Timestamp\('2020-01-01 \d\d:\d\d:\d\d'\)", s) for s in stamps)
    assert stamps.dtype.kind == "U"
    # meta/statistics: 5 stats x 4 fields under all/ and stimulus_Frame/
    shapes = {"images": (), "responses": (n,), "behavior": (3,), "pupil_center": (2,)}
    for field, shape in shapes.items():
      for source in ("all", "stimulus_Frame"):
        for stat in STATS:
          a = load(zf, root, f"meta/statistics/{field}/{source}/{stat}.npy")
          assert a.shape == shape and a.dtype == np.float32, (field, source, stat)
    # No pickles anywhere: every .npy loads with allow_pickle=False.
    for name in names:
      if name.endswith(".npy"):
        np.load(io.BytesIO(zf.read(name)), allow_pickle=False)


def test_image_statistics_match_train_images(tiny_zips):
  zf, root = open_zip(tiny_zips[2])
  tiers = load(zf, root, "meta/trials/tiers.npy")
  images = np.stack([load(zf, root, f"data/images/{i}.npy") for i in np.flatnonzero(tiers == "train")])
  for stat, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max),
                   ("median", np.median)):
    stored = load(zf, root, f"meta/statistics/images/all/{stat}.npy")
    np.testing.assert_allclose(stored, fn(images.astype(np.float64)), rtol=1e-5)
  responses = np.stack([load(zf, root, f"data/responses/{i}.npy")
                        for i in np.flatnonzero(tiers == "train")])
  np.testing.assert_allclose(load(zf, root, "meta/statistics/responses/all/std.npy"),
                             responses.std(0), rtol=1e-5)


def test_tiers_and_shared_test_images(tiny_zips):
  preset = synthesize.PRESETS["tiny"]
  test_sets = []
  for k, path in enumerate(tiny_zips):
    zf, root = open_zip(path)
    tiers = load(zf, root, "meta/trials/tiers.npy")
    ids = load(zf, root, "meta/trials/frame_image_id.npy")
    counts = {t: int(np.sum(tiers == t)) for t in set(tiers)}
    assert counts["train"] == preset.train and counts["validation"] == preset.validation
    test_ids, reps = np.unique(ids[tiers == "test"], return_counts=True)
    assert test_ids.size == preset.test_images and np.all(reps >= preset.test_repeats - 1)
    test_sets.append(tuple(test_ids))
    # Train and validation images are shown once each.
    once = ids[np.isin(tiers, ["train", "validation"])]
    assert np.unique(once).size == once.size
    assert ("final_test" in counts) == (k < 2)          # competition mice only
  assert len(set(test_sets)) == 1                        # the same test images for every mouse


def test_competition_mice_are_withheld(tiny_zips):
  for k, path in enumerate(tiny_zips):
    zf, root = open_zip(path)
    tiers = load(zf, root, "meta/trials/tiers.npy")
    trial_idx = load(zf, root, "meta/trials/trial_idx.npy")
    withheld = np.flatnonzero(np.isin(tiers, ["test", "final_test"]))
    train = np.flatnonzero(tiers == "train")
    resp = lambda i: load(zf, root, f"data/responses/{i}.npy")  # noqa: E731
    if k < 2:
      assert trial_idx.dtype == np.dtype("<U32")
      assert all(re.fullmatch(r"[0-9a-f]{32}", s) for s in trial_idx)
      assert all(np.all(resp(i) == 0) for i in withheld)
      assert any(np.any(resp(i) > 0) for i in train)
    else:
      assert trial_idx.dtype.kind == "i" and sorted(trial_idx) == list(range(tiers.size))
      assert all(np.any(resp(i) > 0) for i in withheld[:5])
    behavior = np.stack([load(zf, root, f"data/behavior/{i}.npy") for i in range(tiers.size)])
    pupil = np.stack([load(zf, root, f"data/pupil_center/{i}.npy") for i in range(tiers.size)])
    if k == 0:   # the SENSORIUM (stimulus-only) mouse
      assert np.all(behavior == 0) and np.all(pupil == 0)
    else:
      assert behavior.std(0).min() > 0 and pupil.std(0).min() > 0


def test_responses_are_nonnegative_with_tiny_positives(tiny_zips):
  zf, root = open_zip(tiny_zips[2])
  r = np.stack([load(zf, root, f"data/responses/{i}.npy") for i in range(40)])
  assert r.min() > 0 and r.min() < 1e-7


def test_ground_truth_beside_zip(tiny_zips):
  for path in tiny_zips:
    truth = np.load(path[:-4] + ".truth.npz")
    zf, root = open_zip(path)
    tiers = load(zf, root, "meta/trials/tiers.npy")
    n = load(zf, root, "meta/neurons/unit_ids.npy").size
    assert truth["rates"].shape == (tiers.size, n)
    np.testing.assert_array_equal(truth["tiers"], tiers)
    assert np.all(truth["rates"] >= 0)
    # The recorded train responses are noisy versions of the rates.
    i = np.flatnonzero(tiers == "train")[:20]
    resp = np.stack([load(zf, root, f"data/responses/{j}.npy") for j in i])
    assert np.corrcoef(resp.ravel(), truth["rates"][i].ravel())[0, 1] > 0.2


def _digest(paths):
  return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_deterministic_given_seed(tiny_zips, tmp_path):
  # Mice written by two spawned processes are the bytes written by one.
  again = synthesize.synthesize(str(tmp_path / "a"), "tiny", seed=0, competition=True, workers=2)
  assert _digest(again) == _digest(tiny_zips)
  other = synthesize.synthesize(str(tmp_path / "b"), "tiny", seed=1, trials=20)
  assert _digest(other)[2] != _digest(tiny_zips)[2]


def test_color_zips(tmp_path):
  paths = synthesize.synthesize(str(tmp_path), "tiny", seed=0, trials=10, color=True)
  zf, root = open_zip(paths[0])
  assert "-ColorImageNet-" in root
  assert load(zf, root, "data/images/0.npy").shape == (2, 36, 64)
  tiers = load(zf, root, "meta/trials/tiers.npy")
  assert "final_test" not in set(tiers)
  for f in ("image_id", "image_class", "trial_ts"):
    assert load(zf, root, f"meta/trials/colorframeprojector_{f}.npy").shape == tiers.shape
  assert f"{root}/meta/trials/frame_image_id.npy" not in zf.namelist()
  assert f"{root}/meta/statistics/images/stimulus_ColorFrameProjector/mean.npy" in zf.namelist()


def test_trials_flag_and_bad_preset(tmp_path):
  paths = synthesize.synthesize(str(tmp_path), "tiny", seed=0, trials=20)
  zf, root = open_zip(paths[0])
  tiers = load(zf, root, "meta/trials/tiers.npy")
  assert np.sum(np.isin(tiers, ["train", "validation"])) == 20
  with pytest.raises(ValueError, match="unknown preset"):
    synthesize.synthesize(str(tmp_path), "huge")


def test_sensorium_preset_shape():
  specs = synthesize.mouse_specs(synthesize.PRESETS["sensorium"], seed=0, trials=None)
  assert [s.neurons for s in specs] == [7776, 7538, 8372, 7344, 7334, 8107, 8098]
  assert [s.data_key for s in specs][:2] == ["26872-17-20", "27204-5-13"]
  assert specs[0].stimulus_only and specs[1].competition and not specs[2].competition
  assert all(4450 <= s.n_train <= 4500 for s in specs)


def test_oracle_ceiling_in_real_data_range(tiny_zips):
  from data_prep import oracle
  result = oracle.oracles(os.path.dirname(tiny_zips[0]), "train")
  values = list(result["oracle_single_trial_correlation"].values())
  assert len(values) == 3 and all(0.3 < v < 0.7 for v in values)   # tiny: few trials, noisy
  withheld = oracle.oracles(os.path.dirname(tiny_zips[0]), "test")
  assert np.isnan(withheld["oracle_single_trial_correlation"]["90001-1-1"])   # competition mouse
  assert np.isfinite(withheld["oracle_single_trial_correlation"]["90003-4-5"])
