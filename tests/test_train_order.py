"""Issue 20: the training batches of an epoch follow the original's CycleDataloaders."""

import numpy as np
import pytest
import tensorflow as tf

from configs import synthetic
from v1t_jax import dataset_meta, losses
from v1t_jax import input_pipeline as ip


def batches(records_n: int, batch: int, steps: int, epochs: int, seed: int = 7, start: int = 0):
  ds = ip._passes(tf.data.Dataset.range(records_n), records_n + 1, batch, steps, seed, start)
  return [b.tolist() for b in ds.take(steps * epochs - start).as_numpy_iterator()]


def test_pass_sizes_and_cycling_by_hand():
  # A mouse of 10 trials, B = 3, epochs of ceil(10 / 3) = 4 steps: 3, 3, 3, 1 (partial).
  big = batches(10, 3, steps=4, epochs=3)
  assert [len(b) for b in big] == [3, 3, 3, 1] * 3
  # A mouse of 4 trials in the same epochs: its pass (3, 1) ends after 2 steps and a second
  # pass starts; every epoch starts afresh.
  small = batches(4, 3, steps=4, epochs=3)
  assert [len(b) for b in small] == [3, 1, 3, 1] * 3
  for e in range(3):
    epoch = big[4 * e: 4 * e + 4]
    assert sorted(sum(epoch, [])) == list(range(10))      # one whole pass per epoch
    s = small[4 * e: 4 * e + 4]
    assert sorted(s[0] + s[1]) == sorted(s[2] + s[3]) == [0, 1, 2, 3]
  assert big[:4] != big[4:8]                                # reshuffled every epoch
  # A mouse with more batches than the epoch: the rest of its pass is dropped.
  cut = batches(10, 3, steps=2, epochs=2)
  assert [len(b) for b in cut] == [3, 3, 3, 3] and len(set(sum(cut[:2], []))) == 6


def test_passes_are_deterministic_and_resumable():
  full = batches(10, 3, steps=4, epochs=3)
  assert full == batches(10, 3, steps=4, epochs=3)
  assert full != batches(10, 3, steps=4, epochs=3, seed=8)
  for start in (1, 4, 6):
    assert batches(10, 3, steps=4, epochs=3, start=start) == full[start:]


@pytest.fixture(scope="module")
def mice(tiny_data_dir):
  return dataset_meta.resolve_mice(tiny_data_dir)


def data_cfg(**overrides):
  cfg = synthetic.get_config("tiny").data
  cfg.update(overrides)
  return cfg


def test_epochs_of_the_tiny_mice(mice):
  # 40 train trials per mouse, B = 6: 7 steps per epoch, the 7th with 4 real rows + 2 padding.
  cfg = data_cfg(batch_size=6)
  steps = ip.steps_per_epoch(mice, 6)
  assert steps == 7
  it = ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1))
  got = [b for _, b in zip(range(2 * steps), it)]
  sizes = [b["valid"].sum(1).tolist() for b in got]
  assert sizes == ([[6, 6, 6]] * 6 + [[4, 4, 4]]) * 2
  last = got[steps - 1]
  assert np.all(last["trial"][:, 4:] == -1) and np.all(last["responses"][:, 4:] == 0)
  for m, meta in enumerate(mice):
    train = sorted(np.flatnonzero(meta.trial_array("tiers") == "train"))
    for e in range(2):
      trials = np.concatenate([b["trial"][m][b["valid"][m]] for b in got[e * 7: e * 7 + 7]])
      assert sorted(trials) == train                      # each epoch is one pass
  resumed = ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1,
                                         start_step=5))
  for b, want in zip(resumed, got[5:9]):
    np.testing.assert_array_equal(b["trial"], want["trial"])


def test_epoch_steps_cut_the_passes(mice):
  # train.max_steps_per_epoch caps the epoch: every epoch starts a fresh pass anyway.
  cfg = data_cfg(batch_size=6)
  it = ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1, epoch_steps=2))
  got = [b for _, b in zip(range(4), it)]
  assert all(b["valid"].all() for b in got)
  first, second = (np.concatenate([b["trial"][0] for b in got[i:i + 2]]) for i in (0, 2))
  assert len(set(first)) == len(set(second)) == 12 and set(first) != set(second)


def test_stream_order_is_kept(mice):
  cfg = data_cfg(batch_size=6, train_order="stream")
  it = ip.as_numpy(ip.train_dataset(mice, cfg, process_index=0, process_count=1))
  got = [b for _, b in zip(range(14), it)]
  assert all(b["valid"].all() for b in got)              # full batches across pass boundaries
  with pytest.raises(ValueError, match="train_order"):
    ip.train_dataset(mice, data_cfg(train_order="epochs"), process_index=0, process_count=1)


def test_partial_batch_scale_counts_real_trials():
  # The original scales a batch of b trials by sqrt(N / b): 20 of 32 rows real -> sqrt(N / 20).
  valid = np.zeros((2, 32), bool)
  valid[0, :20], valid[1] = True, True
  np.testing.assert_allclose(losses.ds_scale([4500, 4500], valid),
                             [np.sqrt(4500 / 20), np.sqrt(4500 / 32)], rtol=1e-6)


def test_batch_norm_statistics_skip_padding_rows():
  # A partial batch of a BatchNorm core (stacked2d): statistics and running stats of its real
  # rows only, as the original's BatchNorm2d sees a batch of those rows.
  import jax.numpy as jnp

  from v1t_jax import stacked2d
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 4, 6)).astype(np.float32)
  valid = np.array([[True] * 3 + [False] * 2, [True] * 5])
  padded = np.where(valid[:, :, None, None, None], x, 0.0)
  bn_pad, bn_m0, bn_m1 = (stacked2d.BatchNorm(6, momentum=0.1) for _ in range(3))
  out = np.asarray(bn_pad(jnp.asarray(padded), train=True, valid_MxB=jnp.asarray(valid)))
  # Reference: each mouse alone at its real batch size (one mouse: one running update each).
  ref0 = np.asarray(bn_m0(jnp.asarray(x[:1, :3]), train=True))
  ref1 = np.asarray(bn_m1(jnp.asarray(x[1:]), train=True))
  np.testing.assert_allclose(out[0, :3], ref0[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[1], ref1[0], rtol=1e-5, atol=1e-5)
  # Running mean: mouse 0's update, then mouse 1's (r <- 0.9 r + 0.1 s).
  want = 0.9 * (0.9 * 0 + 0.1 * x[0, :3].mean((0, 1, 2))) + 0.1 * x[1].mean((0, 1, 2))
  np.testing.assert_allclose(np.asarray(bn_pad.mean[...]), want, rtol=1e-5, atol=1e-6)
