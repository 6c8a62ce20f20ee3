"""The plateau rule of the original's Scheduler (model_spec.md §8.4)."""

from v1t_jax.plateau import Action, Plateau


def run(values, **kw):
  p = Plateau(**kw)
  return [p.update(e, v) for e, v in enumerate(values)], p


def test_drop_on_eleventh_flat_epoch_and_stop_after_two():
  actions, p = run([0.5] + [0.4] * 40)
  assert actions[0] is Action.IMPROVED
  assert actions[1:11] == [Action.WAIT] * 10
  assert actions[11] is Action.REDUCE            # 11th consecutive non-improving epoch
  assert actions[12:22] == [Action.WAIT] * 10 and actions[22] is Action.REDUCE
  assert actions[23:33] == [Action.WAIT] * 10 and actions[33] is Action.STOP
  assert p.lr_scale == 0.3 * 0.3 and p.best == 0.5 and p.best_epoch == 0


def test_improvement_resets_wait_and_reduction_counter():
  values = [0.5] + [0.4] * 11 + [0.6] + [0.4] * 22
  actions, p = run(values)
  assert actions[11] is Action.REDUCE and actions[12] is Action.IMPROVED
  # Without the reset the drop at epoch 34 would be a third one, i.e. a stop.
  assert actions[23] is Action.REDUCE and actions[34] is Action.REDUCE
  assert Action.STOP not in actions and p.num_reduce == 2


def test_equal_value_is_not_an_improvement_and_state_round_trips():
  actions, p = run([0.5, 0.5])
  assert actions == [Action.IMPROVED, Action.WAIT]
  assert Plateau.from_state(p.state()) == p
