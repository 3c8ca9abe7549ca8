"""First runs that just run: defaults that cannot fit a run's budget or data change, with a note.

  adapt = Adaptations(explicit=cli.override_keys(argv), log=print)
  adapt.budget(config)  # a warmup longer than the run
  ...                   # prepare_data(..., adapt=adapt): the vocabulary size, passages
  adapt.apply(config_to_record)  # config.json records what ran

A key named on the command line (`--config.KEY=VALUE`, cli.override_keys) is explicit: it is
never changed, and the check that a default would have failed stays a one-line error naming it.
Every change is logged as one `note:` line and kept in `changes` (summary.json's 'adapted').
"""

from typing import Any, Callable, Iterable


class Adaptations:
  """The defaults a run changed to fit, each with its reason; explicit keys are left alone."""

  def __init__(self, explicit: Iterable[str] = (), log: Callable[[str], None] = print):
    self.explicit = frozenset(explicit)
    self.log = log
    self.changes: dict[str, dict[str, Any]] = {}

  def allowed(self, key: str) -> bool:
    """Returns whether key may be changed (it was not set explicitly)."""
    return key not in self.explicit

  def change(self, config, key: str, value: Any, why: str) -> None:
    """Sets key to value in config, logs one note and records the change."""
    old = config[key]  # ConfigDict reads dotted keys; update_from_flattened_dict writes them
    if old == value:
      return
    config.update_from_flattened_dict({key: value})
    first = self.changes.get(key, {}).get('from', old)
    self.changes[key] = {'from': first, 'to': value, 'why': why}
    self.log(f'note: {key} {old} -> {value}: {why} (set --config.{key} to choose)')

  def adopt(self, config, values: dict[str, Any], why: str) -> None:
    """Sets each allowed key of values that differs in config; logs them on one note line."""
    changed = {k: v for k, v in values.items() if self.allowed(k) and config[k] != v}
    for key, value in changed.items():
      self.changes[key] = {'from': config[key], 'to': value, 'why': why}
    config.update_from_flattened_dict(changed)
    if changed:
      self.log(f'note: {why}: ' + ', '.join(f'{k}={v!r}' for k, v in changed.items())
               + ' (set --config.KEY to choose)')

  def apply(self, config) -> None:
    """Sets every changed key in another copy of the config (the one config.json records)."""
    config.update_from_flattened_dict({key: c['to'] for key, c in self.changes.items()})

  def budget(self, config) -> None:
    """Changes defaults that do not fit train.num_steps: a warmup longer than the run."""
    steps = int(config.train.num_steps)
    if config.optim.warmup_steps > steps and self.allowed('optim.warmup_steps'):
      self.change(config, 'optim.warmup_steps', max(steps // 10, 1),
                  f'the default warmup is longer than the {steps}-step run; a tenth of it')
