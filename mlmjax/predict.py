"""Predictions from a trained workdir: fill-mask (MLM), classify, tag, embed.

  python -m mlmjax.predict --workdir runs/demo "The [MASK] sat on the mat."
  python -m mlmjax.predict --workdir runs/cls --mode classify "Return a new event loop."
  python -m mlmjax.predict --workdir runs/pos --mode tag "The cat sat ."
  python -m mlmjax.predict --workdir runs/ret --mode embed --out emb.npy "first text" "second"

A fine-tuned workdir (config.task 'classify', 'tag' or 'retrieve') is restored from best/ (the best
validation checkpoint) when it holds one, else from checkpoints/ (--checkpoint latest forces that).
Inputs are encoded as the tasks encode them (tasks/task_data.py: cleaned, [CLS] pieces [SEP], cut
to train.seq_len); `embed` works on every workdir (see embed()).
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

from mlmjax import checkpoint, heads, model, schema, sharding, tasks, train_state
from mlmjax import tokenizer as tok

CHECKPOINTS = ('best', 'latest')


@dataclasses.dataclass
class LoadedRun:
  """A trained run: its config, tokenizer, task, model definition and parameters."""
  config: ml_collections.ConfigDict
  tokenizer: object  # tok.Tokenizer or wordpiece.WordPieceTokenizer
  graphdef: object
  params: dict
  step: int
  task: str = 'mlm'  # config.task
  stats: dict = dataclasses.field(default_factory=dict)  # task.json (labels of classify / tag)
  workdir: str = ''
  checkpoint_dir: str = ''  # the directory the parameters came from (checkpoints/ or best/)
  impl: tasks.Task | None = None  # the task object: its predict modes, pooling and formatting
  meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's (progress, data position)

  @property
  def labels(self) -> list[str]:
    """Returns the class (classify) or tag (tag) names in id order; [] for other tasks."""
    return list(self.stats.get('labels', []))


def _has_steps(directory: pathlib.Path) -> bool:
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def load_run(workdir, checkpoint_choice: str = 'best', *, step: int | None = None) -> LoadedRun:
  """Returns the config, tokenizer, task and restored parameters (only those) of a workdir.

  checkpoint_choice 'best' restores best/ when it holds a step (fine-tuning and early stopping
  keep one there), else the latest restorable step of checkpoints/; 'latest' always the latter.
  step: that step of checkpoints/ instead.
  """
  if checkpoint_choice not in CHECKPOINTS:
    raise ValueError(f'--checkpoint {checkpoint_choice!r}: choose one of {", ".join(CHECKPOINTS)}')
  workdir = pathlib.Path(workdir)
  for name in ('config.json', 'checkpoints'):
    if not (workdir / name).exists():
      raise FileNotFoundError(f'{workdir / name} is missing: is {workdir} a workdir written by mlmjax.train?')
  stored = tok.stored_path(workdir)
  if stored is None:
    raise FileNotFoundError(f'{workdir} holds no tokenizer ({" or ".join(tok.WORKDIR_FILES)}): '
                            'is it a workdir written by mlmjax.train or mlmjax.convert?')
  config = schema.upgrade(json.loads((workdir / 'config.json').read_text()))
  tokenizer = tok.load_any(stored)
  task = tasks.create(config, tokenizer, log=lambda _: None)
  meta_path = workdir / 'task.json'  # what train.run stored of the task's data (e.g. label names)
  stats = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
  try:
    task.load_meta(stats)
  except ValueError as e:
    if not meta_path.is_file():
      raise FileNotFoundError(f'{meta_path} is missing: the {task.name!r} model needs the task '
                              'metadata (labels) that mlmjax.train writes there') from None
    raise ValueError(f'{meta_path} {e}') from None
  enc_cfg = model.EncoderConfig(vocab_size=tokenizer.vocab_size, **config.model)
  one_device = ml_collections.ConfigDict({'shape': tuple((a, 1) for a in sharding.MESH_AXES)})
  mesh = sharding.make_mesh(one_device, devices=jax.devices()[:1])
  graphdef, target = train_state.abstract_params(enc_cfg, task.build_model, mesh)
  directory = workdir / 'checkpoints'
  if checkpoint_choice == 'best' and step is None and _has_steps(workdir / 'best'):
    directory = workdir / 'best'
  try:
    step, params, meta = checkpoint.restore_params_in(directory, target, what=f'workdir {workdir}',
                                                      step=step)
  except FileNotFoundError as e:
    if directory.name != 'best':
      raise
    raise FileNotFoundError(f'{e}; try --checkpoint latest') from None
  return LoadedRun(config, tokenizer, graphdef, params, step, task=task.name, stats=stats,
                   workdir=str(workdir), checkpoint_dir=str(directory), impl=task, meta=meta)


def predict(run: LoadedRun, mode: str, inputs, top_k: int = 0) -> list:
  """Returns one result per input for `mode` of the run's task (a single input: one result)."""
  if mode == 'embed':
    return embed(run, inputs)
  if mode not in run.impl.predict_modes:
    hint = ' or '.join([*run.impl.predict_modes, 'embed'])
    raise ValueError(f'--mode {mode} needs a workdir trained with a task that predicts it, but '
                     f'{run.workdir or "this workdir"} was trained with task {run.task!r}; '
                     f'use --mode {hint}')
  single = isinstance(inputs, str)
  out = run.impl.predict(run.graphdef, run.params, mode, [inputs] if single else list(inputs), top_k)
  return out[0] if single else out


def fill_mask(run: LoadedRun, texts, top_k: int = 5) -> list:
  """Returns, per text and per [MASK] in it, the top_k (token, probability) predictions."""
  return predict(run, 'fill_mask', texts, top_k)


def classify(run: LoadedRun, texts, top_k: int = 3) -> list:
  """Returns per text the top_k (label, probability) pairs, most probable first."""
  return predict(run, 'classify', texts, top_k)


def tag(run: LoadedRun, sentences) -> list:
  """Returns per sentence its (word, tag) pairs; a word cut off by train.seq_len gets tag None."""
  if isinstance(sentences, str):
    return predict(run, 'tag', [sentences])[0]
  return predict(run, 'tag', sentences)


@functools.partial(jax.jit, static_argnames=('graphdef', 'task', 'pooling'))
def _embed(params, ids, *, graphdef, task: tasks.Task, pooling: str) -> jax.Array:
  """Returns the (B, H) embeddings of token rows; compiled once per model and batch shape."""
  return task.embedding(nnx.merge(graphdef, params), ids, pooling)


def embed(run: LoadedRun, texts, pooling: str | None = None) -> np.ndarray:
  """Returns float32 embeddings (N, H) of texts ((H,) for a single string), not normalized.

  A retrieve workdir gives its DualEncoder's embedding (rank by cosine). Other workdirs give the
  pooled encoder output: the [CLS] or mean vector its classifier reads (classify.pooling), the mean
  over tokens for mlm and tag. `pooling` ('cls' or 'mean') overrides the choice.
  """
  how = pooling or run.impl.embed_pooling
  if how not in heads.POOLINGS:
    raise ValueError(f'--pooling {how!r}: choose one of {", ".join(heads.POOLINGS)}')
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  if not texts:
    return np.zeros((0, np.shape(run.params['encoder']['token_embed'])[-1]), np.float32)
  vectors = tasks.base.batched(
      lambda ids: _embed(run.params, ids, graphdef=run.graphdef, task=run.impl, pooling=how),
      run.impl.encode_texts(texts)).astype(np.float32)
  return vectors[0] if single else vectors


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
  """Prints predictions of --mode for each text given on the command line."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a workdir written by mlmjax.train')
  parser.add_argument('--mode', default='fill_mask',
                      help='fill_mask (mlm workdirs), classify, tag, embed (any workdir), or a '
                      "mode of the workdir's own task")
  parser.add_argument('--checkpoint', default='best', choices=CHECKPOINTS,
                      help="best: best/ when the run kept one, else the latest; latest: checkpoints/")
  parser.add_argument('--top_k', type=int, default=0,
                      help='predictions shown per [MASK] (default 5) or per text (classify, 3)')
  parser.add_argument('--pooling', default='', help="embed: 'cls' or 'mean' (default: the task's)")
  parser.add_argument('--out', default='', help='embed: save the (n, H) embeddings to this .npy file')
  parser.add_argument('texts', nargs='+',
                      help='texts (fill_mask: with [MASK] where a token is hidden; tag: words '
                      'separated by spaces)')
  args = parser.parse_args(argv)
  if (args.out or args.pooling) and args.mode != 'embed':
    parser.error('--out and --pooling apply to --mode embed only')
  try:
    run = load_run(args.workdir, args.checkpoint)
    if args.mode == 'embed':
      results = embed(run, args.texts, pooling=args.pooling or None)
    else:
      results = predict(run, args.mode, args.texts, top_k=args.top_k)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if args.mode == 'fill_mask':
    print(f'{args.workdir} (step {run.step})')
  else:
    print(f'{args.workdir} (task {run.task}, step {run.step} from {run.checkpoint_dir})')
  if args.mode == 'embed' and args.out:
    np.save(args.out, results)
    print(f'saved {results.shape[0]} x {results.shape[1]} float32 embeddings to {args.out}')
    return
  for text, result in zip(args.texts, results):
    if args.mode == 'embed':
      shown = ' '.join(f'{v:.4f}' for v in result[:8])
      print(f'{text}\n  dim {result.shape[0]}: {shown}{" ..." if result.shape[0] > 8 else ""}')
    else:
      print(run.impl.format_prediction(args.mode, text, result))


if __name__ == '__main__':
  main()
