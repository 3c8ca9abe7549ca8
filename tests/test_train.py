"""End-to-end tests of mlmjax.train.run: a few steps, exact resume, workdir contents, failures."""

import collections
import dataclasses
import json
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from mlmjax import (experiment, flops, input_pipeline, losses, masking, model, optim, predict,
                    sharding, train, train_state, train_step)
from mlmjax.tasks import mlm as mlm_task
from mlmjax import tokenizer as tok


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
  """Returns {step: train loss} from a workdir's metrics.jsonl."""
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    rec = json.loads(line)
    if 'train/loss' in rec:
      out[rec['step']] = rec['train/loss']
  return out


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, make_tiny_config):
  """Returns (config, workdir, summary) of one uninterrupted 8-step tiny run."""
  c = make_tiny_config()
  workdir = tmp_path_factory.mktemp('reference')
  return c, workdir, train.run(c, workdir)


@pytest.mark.slow
def test_workdir_holds_everything(reference_run):
  config, workdir, summary = reference_run
  for name in ('config.json', 'tokenizer.model', 'metrics.jsonl', 'summary.json', 'log.txt'):
    assert (workdir / name).is_file(), name
  events = list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert events
  assert json.loads((workdir / 'config.json').read_text())['train']['num_steps'] == 8
  # TensorBoard's HParams view: the settings and the metric tags, in the scalars' own run.
  import tensorflow as tf  # the reader of event files
  plugins = collections.defaultdict(list)
  for event in tf.compat.v1.train.summary_iterator(str(events[0])):
    for value in event.summary.value:
      plugins[value.metadata.plugin_data.plugin_name].append(value)
  hparams = b''.join(v.metadata.plugin_data.content for v in plugins['hparams'])
  for expected in (b'masking.rate', b'optim.learning_rate', b'eval/accuracy_at_mask', b'train/loss'):
    assert expected in hparams, expected
  scalars = {v.tag for name, values in plugins.items() if name != 'hparams' for v in values}
  assert scalars >= {'eval/accuracy_at_mask', 'train/loss'}
  on_disk = json.loads((workdir / 'summary.json').read_text())
  for key in ('eval/loss', 'eval/accuracy', 'eval/accuracy_at_mask', 'eval/accuracy_at_random',
              'eval/accuracy_at_keep', 'baseline/unigram_accuracy_at_mask',
              'baseline/bigram_accuracy_at_mask', 'tokens_seen', 'wall_time_s', 'best_eval_loss'):
    assert key in on_disk, key
    assert np.isfinite(on_disk[key]), key
  assert on_disk['step'] == 8 and on_disk['finished']
  assert summary['eval/loss'] == pytest.approx(on_disk['eval/loss'])
  # The loss starts near log(vocab) for a fresh model and the accuracies are probabilities.
  losses = _train_losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert abs(losses[1] - np.log(1000)) < 1.5
  assert 0.0 <= on_disk['eval/accuracy_at_mask'] <= 1.0
  ckpts = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert ckpts == [4, 8]
  # MFU in every train record: analytic FLOPs per token times tokens/s over the run's peak.
  enc_cfg = experiment.encoder_config(config, 1000)
  spec = masking.spec_from_config(config.masking, vocab_size=1000, seq_len=config.train.seq_len)
  per_token = flops.train_flops_per_token(enc_cfg, seq_len=config.train.seq_len,
                                          max_predictions=spec.max_predictions)
  peak = flops.device_peak(config.model.dtype)  # cached: the run's own measurement
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    rec = json.loads(line)
    if 'train/loss' in rec:
      assert 0.0 < rec['train/mfu'] < 1.0
      assert rec['train/mfu'] == pytest.approx(
          rec['train/tokens_per_s'] * per_token / (peak.units * peak.flops_per_s), rel=1e-9)
  assert 'MFU counts' in (workdir / 'log.txt').read_text()
  # The tokenizer in the workdir is the one the run used: its specials are fixed.
  t = tok.Tokenizer.load(workdir / 'tokenizer.model')
  assert t.vocab_size == 1000 and t.id_to_piece(tok.MASK_ID) == '[MASK]'


@pytest.mark.slow
def test_resume_continues_with_same_data_and_masks(reference_run, tmp_path):
  config, ref_dir, _ = reference_run
  # Stop after 3 steps (a checkpoint is written on stopping, as on preemption), then rerun.
  first = train.run(config, tmp_path, stop_after=3)
  assert first['step'] == 3 and not first['finished']
  assert sorted(_train_losses(tmp_path)) == [1, 2, 3]
  second = train.run(config, tmp_path)
  assert second['step'] == 8
  # One provenance entry per invocation; the summary holds this one.
  starts = json.loads((tmp_path / 'provenance.json').read_text())
  assert [p['start_step'] for p in starts] == [0, 3]
  assert second['provenance']['command'] == starts[1]['command']
  ref, resumed = _train_losses(ref_dir), _train_losses(tmp_path)
  assert sorted(resumed) == list(range(1, 9))  # one record per step, none duplicated
  for step in range(1, 9):
    assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), step
  a, b = predict.load_run(ref_dir), predict.load_run(tmp_path)
  assert a.step == b.step == 8
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  assert second['eval/loss'] == pytest.approx(reference_run[2]['eval/loss'], rel=1e-5)


@pytest.mark.slow
def test_training_without_tensorflow_matches_tf_data(reference_run, tmp_path, monkeypatch):
  config, ref_dir, _ = reference_run
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # `import tensorflow` now raises ImportError
  assert train.run(config, tmp_path)['finished']
  ref, got = _train_losses(ref_dir), _train_losses(tmp_path)
  assert sorted(got) == list(range(1, 9))
  for step in range(1, 9):
    assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-6), step


@pytest.mark.slow
def test_rerun_of_finished_run_trains_no_more(reference_run, tmp_path):
  config, workdir, summary = reference_run
  again = train.run(config, workdir)
  assert again['step'] == 8
  assert again['eval/loss'] == pytest.approx(summary['eval/loss'], rel=1e-6)


@pytest.mark.slow
def test_fill_mask(reference_run, capsys):
  _, workdir, _ = reference_run
  run = predict.load_run(workdir)
  out = predict.fill_mask(run, 'Return the [MASK] of the [MASK].', top_k=4)
  assert len(out) == 2 and all(len(c) == 4 for c in out)
  for cands in out:
    probs = [p for _, p in cands]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert not any(w in tok.SPECIAL_PIECES for w, _ in cands)
  predict.main(['--workdir', str(workdir), '--top_k', '3', 'The [MASK] is here.'])
  printed = capsys.readouterr().out
  assert '[MASK] #1:' in printed
  with pytest.raises(ValueError, match='no \\[MASK\\]'):
    predict.fill_mask(run, 'Nothing hidden here.')


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_checkpoint(tiny_config, tmp_path):
  c = tiny_config
  c.optim.learning_rate = 1e30  # diverges within a few steps
  c.optim.grad_clip_norm = 0.0
  c.optim.warmup_steps = 0
  c.ckpt.every_steps = 1
  c.train.num_steps = 50
  with pytest.raises(FloatingPointError) as err:
    train.run(c, tmp_path)
  msg = str(err.value)
  assert 'non-finite training loss at step' in msg and 'last good checkpoint' in msg
  assert len(msg.splitlines()) <= 2


def _one_or_two_lines(e: BaseException) -> str:
  msg = str(e)
  assert 1 <= len(msg.strip().splitlines()) <= 2, msg
  return msg


def test_bad_inputs_give_short_errors(tiny_config, tmp_path):
  c = tiny_config
  c.data.corpus = str(tmp_path / 'missing.txt')
  with pytest.raises(FileNotFoundError) as e:
    train.run(c, tmp_path / 'w1')
  assert 'missing.txt' in _one_or_two_lines(e.value)

  empty = tmp_path / 'empty.txt'
  empty.write_text('\n\n\n')
  c.data.corpus = str(empty)
  with pytest.raises(ValueError) as e:
    train.run(c, tmp_path / 'w2')
  assert 'empty.txt' in _one_or_two_lines(e.value)

  latin = tmp_path / 'latin1.txt'
  latin.write_bytes('Caf\u00e9 au lait is served here every morning.\n'.encode('latin-1'))
  c.data.corpus = str(latin)
  with pytest.raises(ValueError) as e:
    train.run(c, tmp_path / 'w3')
  assert 'latin1.txt' in _one_or_two_lines(e.value) and 'UTF-8' in str(e.value)


@pytest.mark.parametrize('key,value,needle', [
    ('masking.rate', 1.5, 'masking.rate'),
    ('masking.rate', 0.0, 'masking.rate'),
    ('masking.split', (0.8, 0.1, 0.2), 'masking.split'),
    ('masking.selection', 'poisson', 'masking.selection'),
    ('train.batch_size', 0, 'train.batch_size'),
    ('optim.decay', 'step', 'optim.decay'),
    ('model.size', 'huge', 'model.size'),
])
def test_bad_config_values_name_the_key(tiny_config, tmp_path, key, value, needle):
  section, field = key.split('.')
  setattr(getattr(tiny_config, section), field, value)
  with pytest.raises(ValueError) as e:
    train.run(tiny_config, tmp_path)
  assert needle in _one_or_two_lines(e.value)


def test_cli_rejects_unknown_key_in_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    train.main(['train', '--config', 'configs/pretrain.py:tiny_classic', '--workdir', str(tmp_path),
                '--config.masking.ratee=0.3'])
  msg = str(e.value.code)
  assert 'ratee' in msg and len(msg.strip().splitlines()) <= 2
  with pytest.raises(SystemExit) as e:
    train.main(['train', '--config', 'configs/pretrain.py:enormous', '--workdir', str(tmp_path)])
  assert 'enormous' in str(e.value.code)


@pytest.mark.slow
@pytest.mark.parametrize('strategy,schedule', [
    ('pmi', {'rate': 0.4, 'schedule.kind': 'linear', 'schedule.end': 0.15, 'schedule.steps': 5}),
    ('span', {'rate': 0.15, 'schedule.kind': 'step', 'schedule.boundaries': (3,),
              'schedule.rates': (0.3, 0.2)}),
])
def test_strategy_and_rate_schedule_logged_every_step(tiny_config, tmp_path, strategy, schedule):
  from mlmjax import masking
  c = tiny_config
  c.train.num_steps = 6
  c.eval.every_steps = 6
  c.masking.strategy = strategy
  c.masking.update_from_flattened_dict(schedule)
  summary = train.run(c, tmp_path)
  sched = masking.rate_schedule_from_config(c.masking, c.train.num_steps)
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  rates = {r['step']: r['train/mask_rate'] for r in records if 'train/mask_rate' in r}
  assert sorted(rates) == list(range(1, 7))  # log_every_steps=1: the rate of every step
  for step, rate in rates.items():
    assert rate == pytest.approx(sched.at(step - 1), abs=1e-7)
    realized = next(r['train/mask_rate_realized'] for r in records if r['step'] == step
                    and 'train/mask_rate_realized' in r)
    assert 0 < realized < 2 * rate
  assert summary['masking']['strategy'] == strategy
  assert summary['eval_rate'] == 0.15  # evaluation keeps its fixed rate
  assert 'masking ' + strategy in (tmp_path / 'log.txt').read_text()


# ---------------------------------------------------------------------------------------------
# Non-finite batches: skipped without an update, counted across resumes, stopped past the limit.


@pytest.mark.slow
def test_train_step_skips_a_non_finite_batch_and_leaves_the_state(tiny_config):
  c = tiny_config
  vocab, seq_len = 64, 16
  enc_cfg = experiment.encoder_config(c, vocab)
  spec = masking.spec_from_config(c.masking, vocab_size=vocab, seq_len=seq_len,
                                  num_steps=c.train.num_steps)
  tx = optim.make_optimizer(c.optim, c.train.num_steps)
  graphdef, _ = train_state.abstract_model(enc_cfg, c.seed)
  step_fn = jax.jit(mlm_task.make_train_step(graphdef, tx, spec, optim.learning_rate_schedule(
      c.optim, c.train.num_steps), dropout=False))
  rng = np.random.default_rng(0)
  good = rng.integers(tok.NUM_SPECIAL, vocab, (4, seq_len)).astype(np.int32)
  good[:, 0], good[:, -1] = tok.CLS_ID, tok.SEP_ID
  bad = good.copy()
  # Ids past the vocabulary (a corrupt token row): jnp.take fills their embeddings with NaN, and
  # attention carries the NaN to every position of the row, the predicted ones included.
  bad[1, 1:4] = vocab
  key = jax.random.key(0)
  state = jax.jit(train_state.make_init_fn(enc_cfg, tx, c.seed))()
  state, _ = step_fn(state, good, key)  # one real update: the Adam moments are non-zero

  skipped, sums = step_fn(state, bad, key)
  assert float(sums['nonfinite']) == 1.0  # the loss itself was non-finite
  for name in ('loss_sum', 'weight', 'correct', 'steps', 'loss_mean_sum', 'grad_norm_sum',
               'lr_sum', 'tokens'):
    assert float(sums[name]) == 0.0, name  # zeroed: the window's sums stay finite
  assert int(skipped['step']) == int(state['step']) + 1  # data order and masks move on
  for before, after in zip(jax.tree.leaves((state['params'], state['opt_state'])),
                           jax.tree.leaves((skipped['params'], skipped['opt_state']))):
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))

  applied, sums = step_fn(skipped, good, key)
  assert float(sums['nonfinite']) == 0.0 and np.isfinite(float(sums['loss_sum']))
  changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(skipped['params']), jax.tree.leaves(applied['params']))]
  assert sum(changed) > len(changed) // 2  # the next finite batch trains as usual
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(applied['params']))


def _stored_state(workdir: pathlib.Path, step: int) -> tuple[list, dict]:
  """Returns (leaves of the saved {params, opt_state}, meta progress) of a checkpoint step."""
  d = workdir / 'checkpoints' / str(step)
  params = ocp.StandardCheckpointer().restore(d / 'params')
  opt_state = ocp.StandardCheckpointer().restore(d / 'opt_state')['opt_state']
  meta = json.loads((d / 'meta' / 'metadata').read_text())
  return [np.asarray(x) for x in jax.tree.leaves((params, opt_state))], meta


@pytest.mark.slow
def test_skipped_batches_are_logged_counted_across_resume_and_stop_past_the_limit(
    tiny_config, tmp_path):
  c = tiny_config
  # Step 1 applies a 1e30-sized update; every later step's loss is then non-finite.
  c.optim.learning_rate = 1e30
  c.optim.grad_clip_norm = 0.0
  c.optim.warmup_steps = 0
  c.train.max_skipped_batches = 2
  c.train.log_every_steps = 4  # the flags of a window are fetched together (and at each save)
  c.ckpt.every_steps = 1
  c.ckpt.max_to_keep = 10
  c.eval.every_steps = 100
  first = train.run(c, tmp_path, stop_after=3)
  assert first['step'] == 3
  log = (tmp_path / 'log.txt').read_text()
  assert 'skipped non-finite batch at step 2 (1 of 2)' in log
  assert 'skipped non-finite batch at step 3 (2 of 2)' in log
  assert 'at step 1 ' not in log
  saved = {s: _stored_state(tmp_path, s) for s in (1, 2, 3)}
  for s in (2, 3):  # the skipped steps left parameters and optimizer state as step 1 wrote them
    for a, b in zip(saved[1][0], saved[s][0]):
      np.testing.assert_array_equal(a, b)
  assert [saved[s][1]['progress']['skipped_batches'] for s in (1, 2, 3)] == [0, 1, 2]
  record = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[-1])
  assert record['step'] == 3 and record['train/skipped_batches'] == 2
  # Skipped steps count their token slots (the compute was spent) but no predictions.
  assert record['train/cum_tokens'] == 3 * c.train.batch_size * c.train.seq_len
  assert record['train/cum_predictions'] == saved[1][1]['progress']['cum_predictions'] > 0

  # The resumed run carries the count: its first skip is the third, one past the limit.
  with pytest.raises(FloatingPointError) as err:
    train.run(c, tmp_path)
  msg = _one_or_two_lines(err.value)
  assert 'non-finite training loss at step 4 after 2 skipped (train.max_skipped_batches)' in msg
  assert 'last good checkpoint: checkpoint step 3 in' in msg


def test_full_disk_is_reported_before_training_starts(tiny_config, tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  # The disk is the environment, not the thing under test: report 1 MiB free.
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=2**20))
  with pytest.raises(ValueError) as e:
    train.run(tiny_config, tmp_path)
  msg = _one_or_two_lines(e.value)
  assert f'workdir {tmp_path} has 1.0 MiB free but the checkpoints need' in msg
  log = (tmp_path / 'log.txt').read_text()
  assert 'training steps' not in log
  assert log.splitlines()[-1] == f'error: {e.value}'.splitlines()[0]  # the error reaches log.txt
  assert not (tmp_path / 'checkpoints').exists()
  assert not (tmp_path / 'provenance.json').exists()  # written only once the checks pass


# ---------------------------------------------------------------------------------------------
# Gradient accumulation and bf16 compute, on the step train.run jits.


def _small_step_parts(c, vocab: int):
  """Returns (enc_cfg, spec, graphdef) of a small custom encoder built from config c."""
  c.model.size = 'custom'
  c.model.hidden_size, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.model.intermediate_size = 64
  c.model.dropout_rate = 0.0
  enc_cfg = experiment.encoder_config(c, vocab)
  spec = masking.spec_from_config(c.masking, vocab_size=vocab, seq_len=c.train.seq_len,
                                  num_steps=c.train.num_steps)
  graphdef, _ = train_state.abstract_model(enc_cfg, c.seed)
  return enc_cfg, spec, graphdef


def _packed_rows(rng: np.random.Generator, batch: int, seq_len: int, vocab: int) -> np.ndarray:
  """Returns packed rows of 1-2 [CLS] ... [SEP] units with PAD tails of varying length."""
  rows = np.zeros((batch, seq_len), np.int32)
  for r in range(batch):
    used = 0
    for n in rng.integers(3, seq_len // 2 - 2, size=2):
      if used + n + 2 > seq_len:
        break
      rows[r, used] = tok.CLS_ID
      rows[r, used + 1:used + 1 + n] = rng.integers(tok.NUM_SPECIAL, vocab, n)
      rows[r, used + 1 + n] = tok.SEP_ID
      used += n + 2
  return rows


@pytest.mark.slow
@pytest.mark.parametrize('optimizer', ['sgd', 'adamw'])
def test_accumulated_microbatches_give_the_large_batch_update(tiny_config, optimizer):
  c = tiny_config
  vocab, batch, k = 64, 8, 4
  c.train.seq_len, c.train.batch_size, c.train.grad_accum_steps = 24, batch, k
  c.optim.warmup_steps, c.optim.decay = 0, 'constant'  # a non-zero learning rate at step 0
  enc_cfg, spec, graphdef = _small_step_parts(c, vocab)
  schedule = optim.learning_rate_schedule(c.optim, c.train.num_steps)
  # SGD moves each parameter by lr * gradient, so a wrongly weighted gradient shows in the
  # parameters; AdamW (the configured chain, clipping included) is what train.run uses.
  tx = optax.sgd(1.0) if optimizer == 'sgd' else optim.make_optimizer(c.optim, c.train.num_steps)
  state = jax.jit(train_state.make_init_fn(enc_cfg, tx, c.seed))()
  # Rows of very different lengths: microbatches select different numbers of tokens, so a mean
  # of microbatch means would differ from the large-batch loss.
  tokens = _packed_rows(np.random.default_rng(3), batch, c.train.seq_len, vocab)
  tokens[::k, 6:] = 0
  key = jax.random.key(c.seed)
  step = jax.jit(mlm_task.make_train_step(graphdef, tx, spec, schedule, dropout=False,
                                       grad_accum_steps=k))
  new_state, sums = step(state, tokens, key)

  # The reference: one pass over the whole batch (microbatches stacked, 8 rows) with the masks
  # the step drew for each microbatch, its loss normalized once by all selected tokens.
  mask_key, _ = train_step.step_keys(key, state['step'])
  micro = train_step.microbatches(jnp.asarray(tokens), k)
  assert micro.shape == (k, batch // k, c.train.seq_len)
  np.testing.assert_array_equal(micro[1], tokens[1::k])
  mbs = jax.jit(jax.vmap(lambda i, rows: train_step.mask_microbatch(mask_key, i, rows, spec)))(
      jnp.arange(k), micro)  # (k, B/k, ...) fields
  layout = jax.vmap(model.packed_layout)(micro)

  def loss_terms(params, mb, tokens_layout):
    position_ids, doc_ids = tokens_layout
    logits = nnx.merge(graphdef, params)(mb.inputs, mb.positions, position_ids=position_ids,
                                         doc_ids=doc_ids)
    return losses.cross_entropy_sum(logits, mb.labels, mb.weights), logits

  def large_batch_loss(params):
    whole = jax.tree.map(lambda x: x.reshape(batch, *x.shape[2:]), (mbs, layout))
    (loss_sum, weight), logits = loss_terms(params, *whole)
    return loss_sum / weight, (logits, whole[0])

  @jax.jit
  def reference(params, opt_state):
    (loss, (logits, whole)), grads = jax.value_and_grad(large_batch_loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    ref_sums = losses.mlm_metric_sums(logits, whole.labels, whole.weights, whole.kinds)
    return optax.apply_updates(params, updates), opt_state, grads, loss, ref_sums

  expected, expected_opt, grads, loss, ref_sums = reference(state['params'], state['opt_state'])
  for name in ('loss_sum', 'weight', 'correct', 'count_mask'):
    np.testing.assert_allclose(float(sums[name]), float(ref_sums[name]), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(float(sums['loss_mean_sum']), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(sums['grad_norm_sum']), float(optax.global_norm(grads)),
                             rtol=1e-5)
  # Adam's first update is lr * g / (|g| + eps): where |g| is a few eps, a change dg of the
  # gradient from fp32 summation order moves it by lr * dg * eps / (|g| + eps)^2 (measured here:
  # 8.5e-5 lr, at g = -8.9e-6 with dg ~ 8e-9). So AdamW's parameters agree to 1e-3 lr absolute,
  # and its moments, which hold the clipped gradient itself, to 1e-5 relative (1e-6 of the largest
  # entry absolute: the attention key bias has a zero gradient, softmax ignores it, and holds
  # only rounding noise).
  # sgd: 1e-6 absolute, float32 summation-order noise (XLA's reduction order moves gradients by
  # ~1e-7), three orders below the 1e-3 a mean of microbatch means is off by (checked below).
  atol = 1e-6 if optimizer == 'sgd' else 1e-3 * float(schedule(0))
  for got, want, before in zip(jax.tree.leaves(new_state['params']), jax.tree.leaves(expected),
                               jax.tree.leaves(state['params'])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=atol)
    if optimizer == 'sgd':  # the update itself, not only the parameters, agrees
      np.testing.assert_allclose(np.asarray(got - before), np.asarray(want - before), rtol=1e-4,
                                 atol=1e-6)
  if optimizer == 'adamw':
    for moment in ('mu', 'nu'):
      got = jax.tree.leaves(optax.tree_utils.tree_get(new_state['opt_state'], moment))
      want = jax.tree.leaves(optax.tree_utils.tree_get(expected_opt, moment))
      scale = max(float(np.abs(np.asarray(w)).max()) for w in want)
      for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6 * scale)

  if optimizer == 'sgd':
    # The test can tell: microbatches select unequal numbers of tokens, and a mean of microbatch
    # means moves SGD's parameters measurably elsewhere.
    assert len({float(w) for w in np.asarray(mbs.weights).sum(axis=(1, 2))}) > 1

    def micro_mean(params, mb, tokens_layout):
      (loss_sum, weight), _ = loss_terms(params, mb, tokens_layout)
      return loss_sum / weight

    per_micro = jax.jit(jax.vmap(jax.grad(micro_mean), in_axes=(None, 0, 0)))(
        state['params'], mbs, layout)
    diff = max(float(jnp.abs(g.mean(0) - ref).max()) for g, ref in
               zip(jax.tree.leaves(per_micro), jax.tree.leaves(grads)))
    assert diff > 1e-3


@pytest.mark.slow
def test_bfloat16_keeps_float32_master_weights_and_optimizer_state(tiny_config):
  vocab = 64
  c = tiny_config
  c.train.seq_len, c.train.batch_size = 24, 8
  c.optim.warmup_steps, c.optim.decay = 0, 'constant'
  c.model.dtype = 'bfloat16'
  enc_cfg, spec, graphdef = _small_step_parts(c, vocab)
  tx = optim.make_optimizer(c.optim, c.train.num_steps)
  state = jax.jit(train_state.make_init_fn(enc_cfg, tx, c.seed))()
  tokens = _packed_rows(np.random.default_rng(4), 8, c.train.seq_len, vocab)
  key = jax.random.key(c.seed)
  step = jax.jit(mlm_task.make_train_step(graphdef, tx, spec, optim.learning_rate_schedule(
      c.optim, c.train.num_steps), dropout=False))
  new_state, sums = step(state, tokens, key)
  # Master weights and Adam's moments stay float32 after an update; only the counts are ints.
  assert {x.dtype for x in jax.tree.leaves(new_state['params'])} == {jnp.dtype('float32')}
  opt_dtypes = {x.dtype for x in jax.tree.leaves(new_state['opt_state'])}
  assert opt_dtypes == {jnp.dtype('float32'), jnp.dtype('int32')}, opt_dtypes
  hidden = jax.eval_shape(lambda p: nnx.merge(graphdef, p).encoder(tokens), new_state['params'])
  assert hidden.dtype == jnp.bfloat16  # activations in the compute dtype

  # The float32 model from the same parameters on the same masks: bf16's ~3 significant digits
  # move the loss by well under 2%.
  c.model.dtype = 'float32'
  graphdef32, _ = train_state.abstract_model(experiment.encoder_config(c, vocab), c.seed)
  mask_key, _ = train_step.step_keys(key, state['step'])

  @jax.jit
  def loss32(params):
    mb = masking.mask_tokens(mask_key, tokens, spec)
    position_ids, doc_ids = model.packed_layout(tokens)
    logits = nnx.merge(graphdef32, params)(mb.inputs, mb.positions, position_ids=position_ids,
                                           doc_ids=doc_ids)
    loss_sum, weight = losses.cross_entropy_sum(logits, mb.labels, mb.weights)
    return loss_sum / weight, weight

  ref, weight = loss32(state['params'])
  assert float(weight) == float(sums['weight']) > 0  # the same masks
  loss16 = float(sums['loss_sum']) / float(sums['weight'])
  assert abs(loss16 - float(ref)) < 0.02 * float(ref)


# ---------------------------------------------------------------------------------------------
# Resume bookkeeping: damaged checkpoints, refused reruns, tokens_seen.


def _metric_steps(workdir: pathlib.Path) -> list[int]:
  return [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _damage(step_dir: pathlib.Path) -> None:
  """Cuts the largest data file of a step's parameters in half (a write cut short)."""
  files = [p for p in (step_dir / 'params').rglob('*') if p.is_file() and p.parent.name == 'd']
  big = max(files, key=lambda p: p.stat().st_size)
  with open(big, 'r+b') as f:
    f.truncate(big.stat().st_size // 2)


def _workdir_files(workdir: pathlib.Path) -> dict[str, bytes]:
  return {n: (workdir / n).read_bytes() for n in ('config.json', 'task.json', 'metrics.jsonl')}


# Orbax's reads of a damaged step can leave a failed coroutine behind that Python reports later.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.slow
def test_resume_past_a_damaged_step_keeps_the_metrics_up_to_the_step_restored(tiny_config,
                                                                             tmp_path):
  c = tiny_config
  c.ckpt.every_steps, c.eval.every_steps = 2, 100
  train.run(c, tmp_path, stop_after=4)  # checkpoints 2 and 4, metrics of steps 1..4
  assert _metric_steps(tmp_path) == [1, 2, 3, 4]
  _damage(tmp_path / 'checkpoints' / '4')
  assert train.run(c, tmp_path, stop_after=1)['step'] == 3
  assert 'resumed from step 2' in (tmp_path / 'log.txt').read_text()
  # Steps 3 and 4 of the first run are gone: the rerun trained from step 2 again.
  assert _metric_steps(tmp_path) == [1, 2, 3]


# Orbax's reads of a damaged step can leave a failed coroutine behind that Python reports later.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.slow
def test_refused_reruns_change_no_workdir_file_and_nothing_restorable_stops(tiny_config, tmp_path):
  c = tiny_config
  c.ckpt.every_steps, c.eval.every_steps = 2, 100
  train.run(c, tmp_path, stop_after=2)
  before = _workdir_files(tmp_path)
  # Another model shape: refused before config.json or task.json record the new shape.
  c.model.intermediate_size = 256
  with pytest.raises(ValueError, match='does not fit this model'):
    train.run(c, tmp_path)
  assert _workdir_files(tmp_path) == before
  c.model.intermediate_size = 0

  # Checkpoints exist but none restores: a clear stop naming the directory and the key, not a
  # silent start from scratch; the damaged step stays where it is.
  _damage(tmp_path / 'checkpoints' / '2')
  with pytest.raises(ValueError) as e:
    train.run(c, tmp_path)
  msg = _one_or_two_lines(e.value)
  assert str(tmp_path / 'checkpoints') in msg and 'ckpt.restart_if_unrestorable=True' in msg
  assert _workdir_files(tmp_path) == before
  assert [p.name for p in (tmp_path / 'checkpoints').iterdir()] == ['2']
  assert not (tmp_path / 'checkpoints_damaged').exists()

  # Asked to: the damaged step is moved aside and the run starts again at step 0, with warnings.
  c.ckpt.restart_if_unrestorable = True
  assert train.run(c, tmp_path, stop_after=1)['step'] == 1
  log = (tmp_path / 'log.txt').read_text()
  assert 'WARNING: checkpoint step 2 does not restore' in log and 'starting over' in log
  assert [p.name.split('.')[0] for p in (tmp_path / 'checkpoints_damaged').iterdir()] == ['2']
  assert _metric_steps(tmp_path) == [1]


def _tokens_through(config, workdir: pathlib.Path) -> np.ndarray:
  """Returns [0, tokens of step 1, of steps 1..2, ...]: non-PAD tokens of each global batch."""
  rows = input_pipeline.prepare_data(config, workdir, log=lambda s: None).cache.train_rows
  per_step = [np.count_nonzero(input_pipeline.global_batch_rows(
      rows, s, global_batch=config.train.batch_size, seed=config.seed) != tok.PAD_ID)
              for s in range(config.train.num_steps)]
  return np.cumsum([0] + per_step).astype(float)


@pytest.mark.slow
def test_checkpoints_count_the_tokens_of_steps_not_yet_logged(tiny_config, tmp_path):
  c = tiny_config
  c.train.log_every_steps, c.ckpt.every_steps, c.ckpt.max_to_keep = 4, 3, 10
  c.eval.every_steps = 100
  summary = train.run(c, tmp_path)  # saves at 3 and 6, between the log lines at 4 and 8
  through = _tokens_through(c, tmp_path)
  for step in (3, 6, 8):
    _, meta = _stored_state(tmp_path, step)
    assert meta['progress']['tokens_seen'] == through[step], step
  assert summary['tokens_seen'] == through[8]
  # Cumulative counters: token slots, analytic FLOPs, predictions (the loss's selected positions).
  counters = ('train/cum_tokens', 'train/cum_flops', 'train/cum_predictions')
  logged = {r['step']: r for r in map(json.loads, (tmp_path / 'metrics.jsonl').read_text()
                                      .splitlines()) if 'train/loss' in r}
  slots = c.train.batch_size * c.train.seq_len
  spec = masking.spec_from_config(c.masking, vocab_size=1000, seq_len=c.train.seq_len)
  per_token = flops.train_flops_per_token(experiment.encoder_config(c, 1000),
                                          seq_len=c.train.seq_len,
                                          max_predictions=spec.max_predictions)
  for step in (4, 8):
    assert logged[step]['train/cum_tokens'] == step * slots
    assert logged[step]['train/cum_flops'] == pytest.approx(step * slots * per_token, rel=1e-12)
  saved = {step: _stored_state(tmp_path, step)[1]['progress'] for step in (3, 6, 8)}
  for step, progress in saved.items():  # checkpoints count the steps not yet logged too
    assert progress['cum_tokens'] == step * slots and progress['counted_step'] == step
  predictions = [saved[3]['cum_predictions'], logged[4]['train/cum_predictions'],
                 saved[6]['cum_predictions'], logged[8]['train/cum_predictions']]
  assert 0 < predictions[0] and predictions == sorted(set(predictions))
  assert predictions[-1] < 8 * slots
  assert saved[8]['cum_predictions'] == predictions[-1]
  # A crash after the save at step 3: the resumed run ends with the uninterrupted count.
  for step in (6, 8):
    shutil.rmtree(tmp_path / 'checkpoints' / str(step))
  resumed = train.run(c, tmp_path)
  assert 'resumed from step 3' in (tmp_path / 'log.txt').read_text()
  assert resumed['step'] == 8 and resumed['tokens_seen'] == summary['tokens_seen']
  relogged = {r['step']: r for r in map(json.loads, (tmp_path / 'metrics.jsonl').read_text()
                                        .splitlines()) if 'train/loss' in r}
  for step in (4, 8):  # the resumed run continues the same counts, exactly
    assert {k: relogged[step][k] for k in counters} == {k: logged[step][k] for k in counters}


@pytest.mark.slow
def test_milestone_checkpoints_keep_the_initial_weights_and_every_nth_step(tiny_config, tmp_path):
  c = tiny_config
  c.ckpt.every_steps, c.ckpt.max_to_keep, c.ckpt.keep_every = 2, 1, 4
  c.eval.every_steps = 100
  train.run(c, tmp_path)
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [0, 4, 8]
  _, meta = _stored_state(tmp_path, 0)
  assert meta['step'] == 0 and meta['progress']['tokens_seen'] == 0
  # Step 0 holds the seed's initialization.
  initial = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / '0' / 'params')
  exp = experiment.setup(c, tmp_path, sharding.make_mesh(c.mesh), log=lambda s: None)
  fresh = jax.device_get(exp.init_state()['params'])
  assert len(jax.tree.leaves(initial)) == len(jax.tree.leaves(fresh)) > 0
  for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_ema_is_evaluated_and_resumes_exactly(make_tiny_config, tmp_path):
  def config():
    c = make_tiny_config()
    c.optim.ema_decay = 0.9
    c.ckpt.every_steps, c.eval.every_steps = 4, 4
    return c

  whole = train.run(config(), tmp_path / 'whole')
  train.run(config(), tmp_path / 'cut', stop_after=4)
  resumed = train.run(config(), tmp_path / 'cut')
  assert resumed['step'] == whole['step'] == 8
  for a, b in zip(_stored_state(tmp_path / 'whole', 8)[0], _stored_state(tmp_path / 'cut', 8)[0]):
    np.testing.assert_array_equal(a, b)  # parameters, Adam moments and the EMA
  assert whole['eval_ema/loss'] == resumed['eval_ema/loss']
  assert whole['eval_ema/loss'] != whole['eval/loss']
  records = [json.loads(l) for l in (tmp_path / 'whole' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'eval_ema/loss' in r] == [4, 8]


def _loss_parts(c):
  """Returns (spec, graphdef, fresh params, 4 packed rows) of a 64-piece model at 24 tokens."""
  vocab = 64
  c.train.seq_len = 24
  _, spec, graphdef = _small_step_parts(c, vocab)
  enc_cfg = experiment.encoder_config(c, vocab)
  params = jax.jit(train_state.make_init_fn(enc_cfg, optax.sgd(1.0), c.seed))()['params']
  return spec, graphdef, params, jnp.asarray(
      _packed_rows(np.random.default_rng(0), 4, c.train.seq_len, vocab))


def test_z_loss_adds_to_the_trained_loss_only(tiny_config):
  c = tiny_config
  vocab = 64
  spec, graphdef, params, rows = _loss_parts(c)
  key = jax.random.key(1)
  coef = 1e-2
  out = {}
  for z in (0.0, coef):
    batch_loss = mlm_task.make_batch_loss(spec, z_loss=z)
    out[z] = jax.jit(lambda p, bl=batch_loss: bl(nnx.merge(graphdef, p), rows, key, None, 0))(
        params)
  (plain, weight, sums0), (with_z, weight_z, sums) = out[0.0], out[coef]
  assert 'z_loss_sum' not in sums0 and float(weight) == float(weight_z) > 0
  assert float(sums['loss_sum']) == float(sums0['loss_sum']) == float(plain)  # metrics: plain CE
  np.testing.assert_allclose(float(with_z), float(plain) + float(sums['z_loss_sum']), rtol=1e-6)
  # A fresh model's logits are near 0, so log Z is near log(vocab).
  per_position = float(sums['z_loss_sum']) / float(weight) / coef
  assert 0.5 * np.log(vocab) ** 2 < per_position < 2 * np.log(vocab) ** 2
  record = mlm_task.MlmTask(c).window_record(
      {k: float(v) for k, v in {**sums, 'steps': 1.0, 'mask_rate_sum': 0.15,
                                'candidates': 60.0}.items()})
  assert record['train/z_loss'] == pytest.approx(coef * per_position, rel=1e-6)
  assert record['train/loss'] == pytest.approx(float(plain) / float(weight), rel=1e-6)


def test_static_masking_gives_the_same_loss_at_every_step(tiny_config):
  c = tiny_config
  spec, graphdef, params, rows = _loss_parts(c)
  losses = {}
  for patterns in (0, 1):
    bl = mlm_task.make_batch_loss(dataclasses.replace(spec, static_patterns=patterns), seed=c.seed)
    run = jax.jit(lambda p, key, bl=bl: bl(nnx.merge(graphdef, p), rows, key, None, 0)[0])
    losses[patterns] = [float(run(params, jax.random.key(k))) for k in (1, 2)]
  assert losses[1][0] == losses[1][1]  # static: the step's key does not reach the masks
  assert losses[0][0] != losses[0][1]


@pytest.mark.slow  # one run: test_optim checks each optimizer's numbers and state layout
def test_optimizer_choice_and_z_loss_train(make_tiny_config, tmp_path):
  optimizer, z_loss = 'lamb', 1e-4
  c = make_tiny_config()
  c.train.num_steps, c.eval.every_steps, c.ckpt.every_steps = 4, 4, 4
  c.optim.optimizer, c.train.z_loss = optimizer, z_loss
  summary = train.run(c, tmp_path)
  assert summary['step'] == 4 and np.isfinite(summary['eval/loss'])
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train_records = [r for r in records if 'train/loss' in r]
  assert [r['step'] for r in train_records] == [1, 2, 3, 4]
  for r in train_records:
    assert ('train/z_loss' in r) == (z_loss > 0)
    if z_loss:
      # train/loss stays the cross-entropy; the step optimized it plus the z term.
      assert 0 < r['train/z_loss'] < 1.0
      assert r['train/step_loss_mean'] == pytest.approx(r['train/loss'] + r['train/z_loss'],
                                                        rel=1e-5)
