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
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlmjax import checkpoint, corpus, sharding
from mlmjax import tokenizer as tok

MODES = ('fill_mask', 'classify', 'tag', 'embed')
CHECKPOINTS = ('best', 'latest')
# Rows per forward call: 8, 16 or 32 (the next power of two), so a few compiles serve any count.
_MIN_BATCH, _MAX_BATCH = 8, 32


@dataclasses.dataclass
class LoadedRun:
  """A trained run: its config, tokenizer, model definition and parameters."""
  config: ml_collections.ConfigDict
  tokenizer: object  # tok.Tokenizer or wordpiece.WordPieceTokenizer
  graphdef: object
  params: dict
  step: int
  task: str = 'mlm'  # config.task: 'mlm', 'classify', 'tag' or 'retrieve'
  stats: dict = dataclasses.field(default_factory=dict)  # task.json (labels of classify / tag)
  workdir: str = ''
  checkpoint_dir: str = ''  # the directory the parameters came from (checkpoints/ or best/)

  @property
  def labels(self) -> list[str]:
    """Returns the class (classify) or tag (tag) names in id order; [] for other tasks."""
    return list(self.stats.get('labels', []))


def _has_steps(directory: pathlib.Path) -> bool:
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def load_run(workdir, checkpoint_choice: str = 'best') -> LoadedRun:
  """Returns the config, tokenizer, task metadata and restored parameters of a workdir.

  checkpoint_choice 'best' restores best/ when it holds a step (fine-tuning and early stopping
  keep one there), else the latest restorable step of checkpoints/; 'latest' always the latter.
  """
  from mlmjax import optim, train_state  # pylint: disable=g-import-not-at-top
  if checkpoint_choice not in CHECKPOINTS:
    raise ValueError(f'--checkpoint {checkpoint_choice!r}: choose one of {", ".join(CHECKPOINTS)}')
  workdir = pathlib.Path(workdir)
  for name in ('config.json', 'checkpoints'):
    if not (workdir / name).exists():
      raise FileNotFoundError(f'{workdir / name} is missing: is {workdir} a workdir written by mlmjax.train?')
  stored = [workdir / n for n in tok.WORKDIR_FILES if (workdir / n).exists()]
  if not stored:
    raise FileNotFoundError(f'{workdir} holds no tokenizer ({" or ".join(tok.WORKDIR_FILES)}): '
                            'is it a workdir written by mlmjax.train or mlmjax.convert?')
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  tokenizer = tok.load_any(stored[0])
  task_name = str(config.get('task', 'mlm') or 'mlm')  # configs before fine-tuning have no task
  enc_cfg = train_state.encoder_config_from(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  stats, build = {}, None
  if task_name != 'mlm':
    from mlmjax import tasks  # pylint: disable=g-import-not-at-top
    meta_path = workdir / 'task.json'
    if not meta_path.is_file():
      raise FileNotFoundError(f'{meta_path} is missing: the {task_name!r} model needs the task '
                              'metadata (labels) that mlmjax.train writes there')
    stats = json.loads(meta_path.read_text())
    if task_name in ('classify', 'tag') and not stats.get('labels'):
      raise ValueError(f'{meta_path} lists no "labels": the {task_name!r} head cannot be rebuilt')
    task = tasks.get_task_class(task_name)(config, tokenizer, lambda _: None)
    task.load_meta(stats)
    build = task.build_model
  builder = {} if build is None else {'build': build}  # MLM: train's own BertForMLM builder
  graphdef, param_state = train_state.abstract_model(enc_cfg, config.seed, **builder)
  init_fn = train_state.make_init_fn(enc_cfg, tx, config.seed, **builder)
  abstract = jax.eval_shape(init_fn)
  one_device = ml_collections.ConfigDict({'shape': tuple((a, 1) for a in sharding.MESH_AXES)})
  mesh = sharding.make_mesh(one_device, devices=jax.devices()[:1])
  shardings = train_state.state_shardings(param_state, abstract, tx, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  directory = workdir / 'checkpoints'
  if checkpoint_choice == 'best' and _has_steps(workdir / 'best'):
    directory = workdir / 'best'
  try:
    step, state, _ = checkpoint.restore_latest_in(directory, target, what=f'workdir {workdir}')
  except FileNotFoundError as e:
    if directory.name != 'best':
      raise
    raise FileNotFoundError(f'{e}; try --checkpoint latest') from None
  return LoadedRun(config, tokenizer, graphdef, state['params'], step, task=task_name,
                   stats=stats, workdir=str(workdir), checkpoint_dir=str(directory))


def _display(piece: str) -> str:
  return piece.replace('\u2581', ' ').strip() or piece


# One compiled forward for every text: rows padded to seq_len, [MASK] slots to a multiple of 8.
@functools.partial(jax.jit, static_argnames=('graphdef', 'cls_id', 'pad_id'))
def _mask_probs(params, ids, pos, special, *, graphdef, cls_id: int, pad_id: int) -> jax.Array:
  """Returns (B, P, V) probabilities at the [MASK] positions pos, special ids excluded."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  position_ids, doc_ids = model.packed_layout(ids, cls_id=cls_id, pad_id=pad_id)
  logits = nnx.merge(graphdef, params)(ids, pos, position_ids=position_ids, doc_ids=doc_ids)
  logits = jnp.where(special, -jnp.inf, logits)  # never predict a special
  return jax.nn.softmax(logits, axis=-1)


def fill_mask(run: LoadedRun, texts, top_k: int = 5) -> list[list[list[tuple[str, float]]]]:
  """Returns, per text and per [MASK] in it, the top_k (token, probability) predictions."""
  _require(run, 'fill_mask', ('mlm',))
  t = run.tokenizer
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  max_len = int(run.config.train.seq_len)
  out = []
  for text in texts:
    # The same cleaning the training corpus had, so the text meets the model as training text did.
    clean = corpus.clean_document(text, fix_text=bool(run.config.data.fix_text),
                                  normalization=str(run.config.data.normalization))
    ids = run.tokenizer.encode_with_specials(clean)
    if t.mask_id not in ids:
      raise ValueError(f'no [MASK] in {text!r}: write [MASK] where a token should be predicted')
    ids = [t.cls_id] + ids[:max_len - 2] + [t.sep_id]
    positions = [i for i, x in enumerate(ids) if x == t.mask_id]
    if not positions:
      raise ValueError(f'every [MASK] in {text!r} lies past train.seq_len={max_len} tokens')
    slots = -(-len(positions) // 8) * 8
    padded_ids = np.full((1, max_len), t.pad_id, np.int32)
    padded_ids[0, :len(ids)] = ids
    padded_pos = np.zeros((1, slots), np.int32)
    padded_pos[0, :len(positions)] = positions
    probs = _mask_probs(run.params, padded_ids, padded_pos, t.special_mask, graphdef=run.graphdef,
                        cls_id=int(t.cls_id), pad_id=int(t.pad_id))
    probs = np.asarray(probs)[0, :len(positions)]
    per_mask = []
    for row in probs:
      best = np.argsort(-row)[:top_k]
      per_mask.append([(_display(run.tokenizer.id_to_piece(int(i))), float(row[i])) for i in best])
    out.append(per_mask)
  return out[0] if single else out


# ---------------------------------------------------------------------------------------------
# Fine-tuned workdirs


def _require(run: LoadedRun, mode: str, tasks: tuple[str, ...]) -> None:
  if run.task not in tasks:
    hint = {'mlm': 'fill_mask or embed', 'classify': 'classify or embed', 'tag': 'tag or embed',
            'retrieve': 'embed'}.get(run.task, 'embed')
    raise ValueError(f'--mode {mode} needs a workdir trained with task {" or ".join(tasks)}, but '
                     f'{run.workdir or "this workdir"} was trained with task {run.task!r}; '
                     f'use --mode {hint}')


def _pooling(run: LoadedRun, pooling: str | None) -> str:
  """Returns the embedding pooling: the task's own unless given ('mean' for mlm and tag)."""
  if pooling:
    return pooling
  if run.task == 'classify':
    return str(run.config.classify.pooling)
  if run.task == 'retrieve':
    return str(run.config.retrieve.pooling)
  return 'mean'


@functools.partial(jax.jit, static_argnames=('graphdef', 'mode', 'pooling', 'pad_id'))
def _forward(params, ids, *, graphdef, mode: str, pooling: str = '', pad_id: int = 0) -> jax.Array:
  """Returns probabilities (classify, tag), the model's own output (own) or a pooled vector (embed).

  Compiled once per model definition and batch shape, shared by every run loaded in the process.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  m = nnx.merge(graphdef, params)
  if mode in ('classify', 'tag'):
    return jax.nn.softmax(m(ids), axis=-1)  # no dropout_rng: dropout is off
  if mode == 'own':
    return m(ids)  # the DualEncoder's embedding
  return model.pool(m.encoder(ids), ids, pooling, pad_id=pad_id)


def _run_rows(run: LoadedRun, rows: np.ndarray, mode: str, pooling: str = '') -> np.ndarray:
  """Returns _forward's outputs for rows (N, L), computed in padded batches of a few fixed sizes."""
  n = len(rows)
  size = min(_MAX_BATCH, max(_MIN_BATCH, 1 << max(n - 1, 0).bit_length()))
  outs = []
  for start in range(0, n, size):
    part = rows[start:start + size]
    padded = np.zeros((size, rows.shape[1]), np.int32)  # all-PAD rows: their outputs are dropped
    padded[:len(part)] = part
    out = _forward(run.params, padded, graphdef=run.graphdef, mode=mode, pooling=pooling,
                   pad_id=int(run.tokenizer.pad_id))
    outs.append(np.asarray(out)[:len(part)])
  return np.concatenate(outs)


def _encode_texts(run: LoadedRun, texts) -> np.ndarray:
  from mlmjax.tasks import task_data  # pylint: disable=g-import-not-at-top
  return task_data.encode_texts(run.tokenizer, texts, int(run.config.train.seq_len))


def classify(run: LoadedRun, texts, top_k: int = 3) -> list[list[tuple[str, float]]]:
  """Returns per text the top_k (label, probability) pairs, most probable first.

  A single string gives a single list.
  """
  _require(run, 'classify', ('classify',))
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  if not texts:
    return []
  probs = _run_rows(run, _encode_texts(run, texts), 'classify')
  labels = run.labels
  out = []
  for row in probs:
    best = np.argsort(-row, kind='stable')[:top_k]
    out.append([(labels[i], float(row[i])) for i in best])
  return out[0] if single else out


def tag(run: LoadedRun, sentences) -> list[list[tuple[str, str | None]]]:
  """Returns per sentence its (word, tag) pairs; a word cut off by train.seq_len gets tag None.

  A sentence is a string (split on whitespace) or a list of words; a single string gives a
  single list. Each word's tag is the model's choice at the word's first piece.
  """
  from mlmjax.tasks import task_data  # pylint: disable=g-import-not-at-top
  _require(run, 'tag', ('tag',))
  single = isinstance(sentences, str)
  sentences = [sentences] if single else list(sentences)
  words = [s.split() if isinstance(s, str) else [str(w) for w in s] for s in sentences]
  if not words:
    return []
  seq_len = int(run.config.train.seq_len)
  encoded = [task_data.encode_words(run.tokenizer, w, seq_len) for w in words]
  rows = np.stack([ids for ids, _ in encoded])
  probs = _run_rows(run, rows, 'tag')
  labels = run.labels
  out = []
  for p, (_, starts), ws in zip(probs, encoded, words):
    out.append([(w, labels[int(np.argmax(p[s]))] if s >= 0 else None) for w, s in zip(ws, starts)])
  return out[0] if single else out


def embed(run: LoadedRun, texts, pooling: str | None = None) -> np.ndarray:
  """Returns float32 embeddings (N, H) of texts ((H,) for a single string), not normalized.

  A retrieve workdir gives its DualEncoder's embedding (rank by cosine). Other workdirs give the
  pooled encoder output: the [CLS] or mean vector its classifier reads (classify.pooling), the mean
  over tokens for mlm and tag. `pooling` ('cls' or 'mean') overrides the choice.
  """
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  how = _pooling(run, pooling)
  if how not in model.POOLINGS:
    raise ValueError(f'--pooling {how!r}: choose one of {", ".join(model.POOLINGS)}')
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  if not texts:
    return np.zeros((0, np.shape(run.params['encoder']['token_embed'])[-1]), np.float32)
  own = run.task == 'retrieve' and how == _pooling(run, None)
  vectors = _run_rows(run, _encode_texts(run, texts), 'own' if own else 'embed', how)
  vectors = vectors.astype(np.float32)
  return vectors[0] if single else vectors


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
  """Prints predictions of --mode for each text given on the command line."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a workdir written by mlmjax.train')
  parser.add_argument('--mode', default='fill_mask', choices=MODES,
                      help='fill_mask (mlm workdirs), classify, tag, or embed (any workdir)')
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
    if args.mode == 'fill_mask':
      results = fill_mask(run, args.texts, top_k=args.top_k or 5)
    elif args.mode == 'classify':
      results = classify(run, args.texts, top_k=args.top_k or 3)
    elif args.mode == 'tag':
      results = tag(run, args.texts)
    else:
      results = embed(run, args.texts, pooling=args.pooling or None)
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
    if args.mode == 'fill_mask':
      print(text)
      for i, cands in enumerate(result):
        shown = '  '.join(f'{w} {p:.3f}' for w, p in cands)
        print(f'  [MASK] #{i + 1}: {shown}')
    elif args.mode == 'classify':
      print(text)
      print('  ' + '  '.join(f'{label} {p:.3f}' for label, p in result))
    elif args.mode == 'tag':
      print(' '.join(f'{w}/{t if t is not None else "?"}' for w, t in result))
    else:
      shown = ' '.join(f'{v:.4f}' for v in result[:8])
      print(text)
      print(f'  dim {result.shape[0]}: {shown}{" ..." if result.shape[0] > 8 else ""}')


if __name__ == '__main__':
  main()
