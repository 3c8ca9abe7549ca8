"""A task added from a file outside mlmjax/ (tests/toy/) trains through train.run and predicts."""

import json

import numpy as np
import pytest

from mlmjax import predict, train


@pytest.mark.slow
def test_a_task_from_outside_mlmjax_trains_resumes_and_predicts(make_tiny_config, topics_tokenizer,
                                                                 tmp_path, capsys):
  c = make_tiny_config()
  c.task = 'tests.toy.contains_word:ContainsWordTask'
  c.tokenizer.path = topics_tokenizer.model_path
  c.train.seq_len, c.train.batch_size, c.train.num_steps = 16, 16, 40
  c.optim.learning_rate, c.optim.warmup_steps = 3e-3, 4
  c.eval.every_steps = c.ckpt.every_steps = 20
  c.eval.batch_size = 16
  c.train.log_every_steps = 10
  workdir = tmp_path / 'toy'
  first = train.run(c, workdir, stop_after=20)
  assert first['step'] == 20 and not first['finished']
  summary = train.run(c, workdir)
  assert summary['finished'] and summary['task'] == 'contains_word'
  # The task's own metric drives the best checkpoint, and the test split is scored with it.
  assert summary['best_metric'] == 'accuracy' and summary['best_step'] in (20, 40)
  assert summary['test/accuracy'] > 0.75, summary  # the word is visible in every sentence
  assert json.loads((workdir / 'task.json').read_text())['task'] == 'contains_word'

  run = predict.load_run(workdir)
  assert run.task == 'contains_word'
  p = predict.predict(run, 'contains', ['alpha river stone', 'river stone cloud paper'])
  assert p[0] > 0.5 > p[1]
  assert np.asarray(predict.embed(run, 'alpha beta')).shape == (run.params['encoder']['token_embed'].shape[-1],)
  predict.main(['--workdir', str(workdir), '--mode', 'contains', 'alpha beta gamma'])
  assert 'alpha beta gamma' in capsys.readouterr().out
