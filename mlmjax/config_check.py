"""Up-front config checks: keys and types against the schema, allowed values, ranges, combinations.

Every config is checked against mlmjax/schema.py's defaults(), whatever file built it: a key the
schema has must be present (old config.json files go through schema.upgrade() first), and its value
must have the default's type: bool is not an int, an int is accepted where a float is expected, a
list where a tuple is. Keys the schema does not know (a custom task's own section) are not typed.
"""

from typing import Any

from mlmjax import corpus, heads, masking, model, optim, schema, sources, tasks, tokenizer

# Keys that take one of a fixed set of values, from the module that owns each set. config.task is
# checked against the task registry (tasks.names(), or a 'package.module:ClassName').
ALLOWED: dict[str, tuple] = {
    'data.normalization': corpus.NORMALIZATIONS,
    'data.bad_input': sources.BAD_INPUT_POLICIES,
    'tokenizer.model_type': tokenizer.MODEL_TYPES,
    'masking.selection': masking.SELECTIONS,
    'masking.strategy': masking.STRATEGIES,
    'masking.schedule.kind': masking.RATE_SCHEDULES,
    'model.size': (*model.SIZES, 'custom'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.attention_impl': model.ATTENTION_IMPLS,
    'model.position_embedding': model.POSITIONS,
    'model.mlp_type': model.MLPS,
    'model.norm': model.NORMS,
    'model.remat': tuple(model.REMAT_POLICIES),
    'optim.decay': optim.DECAYS,
    'optim.optimizer': optim.OPTIMIZERS,
    'early_stop.mode': ('', 'min', 'max'),
    'classify.pooling': heads.POOLINGS,
    'retrieve.pooling': heads.POOLINGS,
}
_HINTS = {'model.size': " ('custom' takes model.hidden_size, num_layers, num_heads, "
                        "intermediate_size)",
          'data.normalization': " ('' turns normalization off)",
          'model.attention_impl': " ('' lets XLA choose)",
          'model.remat': " ('' = no rematerialization)",
          'early_stop.mode': " ('' = the task's default for its metric)"}

# Allowed intervals ('[' and ']' include a bound); keys in _INTEGERS must also be ints.
_RANGES = {
    'train.num_steps': '[1, inf)', 'train.batch_size': '[1, inf)', 'train.seq_len': '[1, inf)',
    'train.log_every_steps': '[1, inf)', 'train.max_wall_minutes': '[0, inf)',
    'train.max_skipped_batches': '[0, inf)', 'train.grad_accum_steps': '[1, inf)',
    'train.z_loss': '[0, inf)', 'train.budget_tokens': '[0, inf)',
    'train.budget_minutes': '[0, inf)', 'train.batch_warmup_steps': '[0, inf)',
    'train.batch_warmup_from': '[0, inf)',
    'eval.every_steps': '[1, inf)',
    'eval.batch_size': '[1, inf)', 'eval.num_batches': '[0, inf)', 'eval.rate': '(0, 1)',
    'ckpt.every_steps': '[1, inf)', 'ckpt.max_to_keep': '[1, inf)',
    'ckpt.keep_every': '[0, inf)',
    'data.max_line_chars': '[1, inf)', 'data.val_fraction': '[0, 1)', 'data.prefetch': '[0, inf)',
    'data.shard_chars': '[1, inf)', 'data.side_table_tokens': '[0, inf)',
    'tokenizer.sample_chars': '[0, inf)',
    'masking.span.p': '(0, 1]', 'masking.span.max': '[1, inf)', 'masking.schedule.steps': '[0, inf)',
    'model.dropout_rate': '[0, 1)', 'model.attention_dropout_rate': '[0, 1)',
    'model.rope_theta': '(0, inf)', 'model.rope_local_theta': '(0, inf)',
    'model.global_every': '[1, inf)', 'model.local_window': '[0, inf)',
    'model.vocab_multiple': '[1, inf)', 'model.type_vocab_size': '[0, inf)',
    'optim.learning_rate': '(0, inf)',
    'optim.warmup_steps': '[0, inf)', 'optim.decay_steps': '[0, inf)',
    'optim.decay_fraction': '[0, 1]',
    'optim.end_lr_fraction': '[0, 1]',
    'optim.weight_decay': '[0, inf)', 'optim.grad_clip_norm': '[0, inf)', 'optim.b1': '[0, 1)',
    'optim.b2': '[0, 1)', 'optim.eps': '(0, inf)', 'optim.ema_decay': '[0, 1)',
    'early_stop.patience': '[0, inf)', 'early_stop.min_delta': '[0, inf)',
    'task_data.val_fraction': '[0, 1)', 'task_data.test_fraction': '[0, 1)',
    'task_data.max_examples': '[0, inf)', 'retrieve.temperature': '(0, inf)',
    'retrieve.num_candidates': '[0, inf)',
}
_INTEGERS = frozenset({
    'train.num_steps', 'train.batch_size', 'train.seq_len', 'train.log_every_steps',
    'train.max_skipped_batches', 'train.grad_accum_steps', 'eval.every_steps', 'eval.batch_size',
    'train.budget_tokens', 'train.batch_warmup_steps', 'train.batch_warmup_from',
    'eval.num_batches', 'ckpt.every_steps', 'ckpt.max_to_keep', 'ckpt.keep_every',
    'data.max_line_chars', 'data.shard_chars', 'data.side_table_tokens', 'tokenizer.sample_chars',
    'data.prefetch', 'masking.span.max', 'masking.schedule.steps', 'optim.warmup_steps',
    'optim.decay_steps',
    'early_stop.patience', 'task_data.max_examples', 'retrieve.num_candidates',
    'model.global_every', 'model.local_window', 'model.vocab_multiple', 'model.type_vocab_size'})


def _describe(ref: Any) -> str:
  """Returns the type a reference value asks for, in words ('float', 'tuple of (str, int)')."""
  if isinstance(ref, bool):
    return 'bool'
  if isinstance(ref, int):
    return 'int'
  if isinstance(ref, float):
    return 'float'
  if isinstance(ref, str):
    return 'str'
  if isinstance(ref, (tuple, list)):
    parts = [_describe(x) for x in ref]
    if not parts:
      return 'tuple'
    if len(set(parts)) == 1:
      return f'tuple of {parts[0]}'
    return f'({", ".join(parts)})'
  return type(ref).__name__


def _fits(value: Any, ref: Any) -> bool:
  """Returns whether value has the type of reference value ref (recursing into tuples)."""
  if ref is None:
    return True
  if isinstance(ref, bool):
    return isinstance(value, bool)
  if isinstance(ref, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(ref, str):
    return isinstance(value, str)
  if isinstance(ref, (tuple, list)):
    if not isinstance(value, (tuple, list)):
      return False
    if not ref:
      return True
    if len({_describe(x) for x in ref}) == 1:  # homogeneous: any length, each like the first
      return all(_fits(v, ref[0]) for v in value)
    return len(value) == len(ref) and all(_fits(v, r) for v, r in zip(value, ref))
  return isinstance(value, type(ref))


def _leaves(config, prefix: str = ''):
  """Yields (dotted key, value) of every leaf of a ConfigDict or dict."""
  for key in sorted(config.keys()):
    value = config[key]
    if hasattr(value, 'keys') and hasattr(value, '__getitem__'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _get(config, key: str) -> Any:
  """Returns the value of dotted key in config, or None when config lacks it."""
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return None
    node = node[part]
  return node


def _inside(value: float, interval: str) -> bool:
  """Returns whether value lies in an interval written like '[0, 1)' or '(0, inf)'."""
  low, high = (float(x) for x in interval[1:-1].split(','))
  above_low = value >= low if interval[0] == '[' else value > low
  below_high = value <= high if interval[-1] == ']' else value < high
  return above_low and below_high


def _allowed_text(key: str) -> str:
  return f'; one of {ALLOWED[key]}{_HINTS.get(key, "")}' if key in ALLOWED else ''


def check_types(config, reference) -> None:
  """Raises ValueError naming the first key of `reference` that config lacks or holds another type of."""
  ref_leaves = dict(_leaves(reference))
  leaves = dict(_leaves(config))
  missing = sorted(set(ref_leaves) - set(leaves))
  if missing:
    raise ValueError(f'{missing[0]}: missing from the config ({len(missing)} key(s) missing); a '
                     'config.json of an older run is read with mlmjax.schema.upgrade()')
  for key, value in sorted(leaves.items()):
    if key in ref_leaves and not _fits(value, ref_leaves[key]):
      raise ValueError(f'{key}={value!r}: expected {_describe(ref_leaves[key])}'
                       f'{_allowed_text(key)}')


def check_values(config) -> None:
  """Raises ValueError naming the key of an unknown choice, an out-of-range number or a bad pair."""
  for key, allowed in ALLOWED.items():
    value = _get(config, key)
    if value is not None and value not in allowed:
      raise ValueError(f'{key}={value!r}: choose one of {allowed}{_HINTS.get(key, "")}')
  task = _get(config, 'task')
  if task is not None and task not in tasks.names() and ':' not in str(task):
    raise ValueError(f'task={task!r}: choose one of {tuple(tasks.names())} or name a Task class '
                     "as 'package.module:ClassName'")
  for key, interval in _RANGES.items():
    value = _get(config, key)
    if value is None:
      continue
    number = (int,) if key in _INTEGERS else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
      raise ValueError(f'{key}={value!r}: expected {"an int" if key in _INTEGERS else "a number"} '
                       f'in {interval}')
    if not _inside(value, interval):
      raise ValueError(f'{key}={value!r} must be in {interval}')
  warmup, steps = _get(config, 'optim.warmup_steps'), _get(config, 'train.num_steps')
  if warmup is not None and steps is not None and warmup > steps:
    raise ValueError(f'optim.warmup_steps={warmup} exceeds train.num_steps={steps}: the learning '
                     'rate would never reach its peak; lower the warmup')
  seq_len, max_position = _get(config, 'train.seq_len'), _get(config, 'model.max_position')
  learned = _get(config, 'model.position_embedding') in (None, 'learned')
  if learned and seq_len is not None and max_position is not None and seq_len > max_position:
    raise ValueError(f'train.seq_len={seq_len} exceeds model.max_position={max_position} (the '
                     "learned position table; model.position_embedding='rope' has no such limit)")
  batch, accum = _get(config, 'train.batch_size'), _get(config, 'train.grad_accum_steps')
  if batch is not None and accum is not None and batch % accum:
    raise ValueError(f'train.batch_size={batch} must be divisible by '
                     f'train.grad_accum_steps={accum} (equal microbatches)')
  val, test = _get(config, 'task_data.val_fraction'), _get(config, 'task_data.test_fraction')
  if val is not None and test is not None and val + test >= 1:
    raise ValueError(f'task_data.val_fraction={val} + task_data.test_fraction={test} leave no '
                     'training examples; lower them')
  prepared, mixture = _get(config, 'data.prepared'), _get(config, 'data.mixture')
  if prepared and mixture:
    raise ValueError(f'data.prepared={prepared!r} and data.mixture={mixture!r} both name the '
                     'training data; set one of them')
  if prepared or mixture:
    key = 'data.prepared' if prepared else 'data.mixture'
    for other in ('data.decontaminate.configs', 'tokenizer.extend_pieces'):
      if _get(config, other):
        raise ValueError(f'{other}={_get(config, other)!r} does not apply to a prepared build '
                         f'({key}); clear one of them')
  split = _get(config, 'eval.split')
  if split is not None and (len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6):
    raise ValueError(f'eval.split={tuple(split)} must be three fractions >= 0 that sum to 1 '
                     '([MASK], random token, unchanged)')


def check_config(config) -> None:
  """Raises ValueError naming the key that is missing or has a wrong type, choice, range or pair.

  Types are those of mlmjax.schema.defaults(), for every config family.
  """
  check_types(config, schema.defaults())
  check_values(config)
