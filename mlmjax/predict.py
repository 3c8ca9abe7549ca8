"""Fill-mask from a trained workdir: `python -m mlmjax.predict --workdir runs/demo "The [MASK] ..."`."""

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlmjax import checkpoint, corpus, sharding
from mlmjax import tokenizer as tok


@dataclasses.dataclass
class LoadedRun:
  """A trained run: its config, tokenizer, model definition and parameters."""
  config: ml_collections.ConfigDict
  tokenizer: object  # tok.Tokenizer or wordpiece.WordPieceTokenizer
  graphdef: object
  params: dict
  step: int


def load_run(workdir) -> LoadedRun:
  """Returns the config, tokenizer and latest restorable parameters of a workdir."""
  from mlmjax import optim, train  # pylint: disable=g-import-not-at-top
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
  enc_cfg = train.encoder_config_from(config, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  graphdef, param_state = train.abstract_model(enc_cfg, config.seed)
  init_fn = train.make_init_fn(enc_cfg, tx, config.seed)
  abstract = jax.eval_shape(init_fn)
  one_device = ml_collections.ConfigDict({'shape': tuple((a, 1) for a in sharding.MESH_AXES)})
  mesh = sharding.make_mesh(one_device, devices=jax.devices()[:1])
  shardings = train.state_shardings(param_state, abstract, tx, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  step, state, _ = checkpoint.restore_latest_in(workdir / 'checkpoints', target,
                                                what=f'workdir {workdir}')
  return LoadedRun(config, tokenizer, graphdef, state['params'], step)


def _display(piece: str) -> str:
  return piece.replace('\u2581', ' ').strip() or piece


def fill_mask(run: LoadedRun, texts, top_k: int = 5) -> list[list[list[tuple[str, float]]]]:
  """Returns, per text and per [MASK] in it, the top_k (token, probability) predictions."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mlmjax import model  # pylint: disable=g-import-not-at-top
  t = run.tokenizer
  single = isinstance(texts, str)
  texts = [texts] if single else list(texts)
  max_len = int(run.config.train.seq_len)
  # One compiled forward for every text: rows padded to seq_len, [MASK] slots to a multiple of 8.
  @jax.jit
  def probs_fn(params, ids, pos):
    position_ids, doc_ids = model.packed_layout(ids, cls_id=t.cls_id, pad_id=t.pad_id)
    logits = nnx.merge(run.graphdef, params)(ids, pos, position_ids=position_ids, doc_ids=doc_ids)
    logits = jnp.where(jnp.asarray(t.special_mask), -jnp.inf, logits)  # never predict a special
    return jax.nn.softmax(logits, axis=-1)

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
    probs = np.asarray(probs_fn(run.params, padded_ids, padded_pos))[0, :len(positions)]
    per_mask = []
    for row in probs:
      best = np.argsort(-row)[:top_k]
      per_mask.append([(_display(run.tokenizer.id_to_piece(int(i))), float(row[i])) for i in best])
    out.append(per_mask)
  return out[0] if single else out


def main(argv=None) -> None:
  """Prints fill-mask predictions for each text given on the command line."""
  parser = argparse.ArgumentParser(prog='python -m mlmjax.predict', description=__doc__)
  parser.add_argument('--workdir', required=True, help='a workdir written by mlmjax.train')
  parser.add_argument('--top_k', type=int, default=5, help='predictions shown per [MASK]')
  parser.add_argument('texts', nargs='+', help='sentences with [MASK] where a token is hidden')
  args = parser.parse_args(argv)
  try:
    run = load_run(args.workdir)
    results = fill_mask(run, args.texts, top_k=args.top_k)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  print(f'{args.workdir} (step {run.step})')
  for text, per_mask in zip(args.texts, results):
    print(text)
    for i, cands in enumerate(per_mask):
      shown = '  '.join(f'{w} {p:.3f}' for w, p in cands)
      print(f'  [MASK] #{i + 1}: {shown}')


if __name__ == '__main__':
  main()
