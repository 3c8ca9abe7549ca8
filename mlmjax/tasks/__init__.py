"""The task registry: `config.task` names a built-in task or a class `package.module:ClassName`.

Built-in tasks live one per file in this package (tasks/<name>.py) and are imported only when a
run asks for them. A task from outside mlmjax needs no registration: set config.task to
'my_package.my_task:MyTask' (the module must be importable), or call register() first.
"""

import importlib

from mlmjax.tasks.base import LabelTask, Task, TaskData, format_metrics  # noqa: F401  (the protocol)

_REGISTRY = {
    'mlm': 'mlmjax.tasks.mlm:MlmTask',
    'classify': 'mlmjax.tasks.classify:ClassifyTask',
    'tag': 'mlmjax.tasks.tag:TagTask',
    'retrieve': 'mlmjax.tasks.retrieve:RetrieveTask',
    'regress': 'mlmjax.tasks.regress:RegressTask',
}


def names() -> list[str]:
  """Returns the registered task names."""
  return list(_REGISTRY)


def register(name: str, target: str) -> None:
  """Registers `target` ('package.module:ClassName') under `name` for config.task."""
  if ':' not in target:
    raise ValueError(f"task {name!r}: register it as 'package.module:ClassName', not {target!r}")
  _REGISTRY[name] = target


def get_task_class(name: str) -> type:
  """Returns the Task subclass of config.task: a registered name or 'package.module:ClassName'."""
  target = _REGISTRY.get(name, name)
  module_name, _, attr = target.partition(':')
  if not attr:
    raise ValueError(f"task: {name!r} is not a task; choose one of {names()} or name a class as "
                     "'package.module:ClassName'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f'task: {name!r}: cannot import {module_name} ({e})') from None
  cls = getattr(module, attr, None)
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise ValueError(f'task: {name!r}: {module_name} has no Task subclass {attr!r}')
  return cls


def create(config, tokenizer=None, log=print) -> Task:
  """Returns the config.task Task for config (its tokenizer is resolved by prepare())."""
  return get_task_class(str(config.task))(config, tokenizer, log)
