"""The facts of an exported run (mlmjax.json) and the Hugging Face model card (README.md) made of them.

The card is rendered from the facts alone, so a re-export of an imported export, which carries the
original facts, writes the same card. Every workdir file is optional: what is missing is said so.
"""

import json
import pathlib

from mlmjax import hf_models

FACTS_FILE = 'mlmjax.json'
FORMAT = 1
_VERSIONS = ('python', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'sentencepiece')
_METRIC_PREFIXES = ('eval/', 'baseline/')
# The Hub tag of each exported class: its transformers model_type.
_TAGS = {a.architecture: a.model_type for a in hf_models.ARCHS.values()}


def _read_json(path: pathlib.Path):
  """Returns the JSON in path, or None when it is absent or unreadable."""
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _provenance(entries) -> list[dict] | None:
  """Returns per start of the run: when, the command, the commit, dirty, the step and versions."""
  if not isinstance(entries, list) or not entries:
    return None
  out = []
  for e in entries:
    if not isinstance(e, dict):
      continue
    versions = e.get('versions') or {}
    out.append({'started': e.get('started'), 'command': e.get('command'), 'commit': e.get('commit'),
                'dirty': e.get('dirty'), 'start_step': e.get('start_step'),
                'versions': {k: versions[k] for k in _VERSIONS if k in versions}})
  return out or None


def gather(workdir, config: dict, *, step: int, architecture: str, model_shape: dict,
           tokenizer: dict, model_sha256: str) -> dict:
  """Returns the JSON-ready facts of a run: model, tokenizer, data, training, masking, metrics, provenance."""
  workdir = pathlib.Path(workdir)
  summary = _read_json(workdir / 'summary.json') or {}
  task = _read_json(workdir / 'task.json') or {}
  data, train, optim = config.get('data', {}), config.get('train', {}), config.get('optim', {})
  splits = {name: {k: task[name].get(k) for k in ('documents', 'tokens', 'rows')}
            for name in ('train', 'val') if isinstance(task.get(name), dict)}
  metrics = {k: v for k, v in sorted(summary.items())
             if (k.startswith(_METRIC_PREFIXES) or (k.startswith('eval_') and '/' in k))
             and isinstance(v, (int, float)) and not isinstance(v, bool)}
  return {
      'format': FORMAT, 'run': workdir.resolve().name, 'task': config.get('task', 'mlm'),
      'architecture': architecture, 'model': model_shape, 'tokenizer': tokenizer, 'step': int(step),
      'model_sha256': model_sha256,
      'data': {'corpus': data.get('corpus'), 'fix_text': data.get('fix_text'),
               'normalization': data.get('normalization'), 'min_chars': data.get('min_chars'),
               'max_documents': data.get('max_documents'), 'dedup': data.get('dedup'),
               'val_fraction': data.get('val_fraction'), 'splits': splits or None},
      'training': {'num_steps': train.get('num_steps'), 'batch_size': train.get('batch_size'),
                   'seq_len': train.get('seq_len'), 'seed': config.get('seed'),
                   'learning_rate': optim.get('learning_rate'),
                   'warmup_steps': optim.get('warmup_steps'), 'decay': optim.get('decay'),
                   'weight_decay': optim.get('weight_decay'), 'init_from': config.get('init_from'),
                   'finished': summary.get('finished'), 'tokens_seen': summary.get('tokens_seen'),
                   'wall_time_s': summary.get('wall_time_s')},
      'masking': {**config.get('masking', {}), 'eval_rate': config.get('eval', {}).get('rate')},
      'metrics': metrics or None,
      'best': ({'eval_loss': summary['best_eval_loss'], 'step': summary.get('best_eval_step')}
               if 'best_eval_loss' in summary else None),
      'provenance': _provenance(_read_json(workdir / 'provenance.json')),
  }


def dumps(facts: dict) -> str:
  """Returns the facts as mlmjax.json text (sorted keys, so equal facts give equal bytes)."""
  return json.dumps(facts, indent=2, sort_keys=True) + '\n'


def _num(x) -> str:
  if isinstance(x, bool) or x is None:
    return str(x)
  if isinstance(x, int):
    return f'{x:,}'
  return f'{x:.4g}' if abs(x) < 1e-3 or abs(x) >= 1e5 else f'{x:.4f}'.rstrip('0').rstrip('.')


def _masking(m: dict) -> str:
  """Returns the masking policy in a sentence."""
  split = m.get('split') or (0.8, 0.1, 0.1)
  strategy = m.get('strategy', 'token')
  unit = {'token': 'tokens', 'whole_word': 'whole words', 'span': 'spans', 'pmi': 'PMI n-grams'}
  text = (f'{_num(100 * m.get("rate", 0.15))}% of the maskable tokens selected '
          f'({m.get("selection", "exact")} selection, in {unit.get(strategy, strategy)}); of the '
          f'selected, {_num(100 * split[0])}% become [MASK], {_num(100 * split[1])}% a random '
          f'token, {_num(100 * split[2])}% stay unchanged')
  schedule = m.get('schedule') or {}
  if schedule.get('kind', 'constant') != 'constant':
    text += f'; rate schedule {schedule.get("kind")} to {schedule.get("end")}'
  if strategy == 'span' and m.get('span'):
    s = m['span']
    text += f'; span lengths Geometric(p={s.get("p")}) up to {s.get("max")}'
  if m.get('eval_rate') is not None:
    text += (f'. Evaluation masks {_num(100 * m["eval_rate"])}% with a fixed key, whatever the '
             'training rate')
  return text + '. Masks are drawn anew every step (dynamic masking); special ids are never selected.'


def _provenance_lines(prov) -> list[str]:
  if not prov:
    return ['Not recorded: the workdir held no provenance.json.']
  lines = []
  for i, e in enumerate(prov):
    commit = e.get('commit') or 'unknown (not a git checkout)'
    dirty = ' with uncommitted changes' if e.get('dirty') else ''
    start = f' from step {e["start_step"]}' if e.get('start_step') else ''
    lines.append(f'- start {i + 1}{start}, {e.get("started") or "time not recorded"}: mlmjax '
                 f'commit `{commit}`{dirty}')
    lines.append(f'  - command: `{e.get("command") or "not recorded"}`')
  versions = prov[-1].get('versions') or {}
  if versions:
    lines.append('- versions: ' + ', '.join(f'{k} {v}' for k, v in versions.items()))
  return lines


def _training_lines(facts: dict) -> list[str]:
  """Returns the Data, Training and Results sections of the card."""
  d, tr = facts.get('data') or {}, facts.get('training') or {}
  lines = ['## Data', '']
  splits = d.get('splits')
  lines.append(f'Corpus `{d.get("corpus")}`, cleaned before tokenizing (ftfy repair: {d.get("fix_text")}, '
               f'Unicode normalization: {d.get("normalization") or "none"}, documents under '
               f'{d.get("min_chars")} characters dropped, exact duplicates dropped: {d.get("dedup")}).')
  if splits:
    lines += ['', '| split | documents | tokens |', '|---|---|---|']
    lines += [f'| {name} | {_num(s.get("documents"))} | {_num(s.get("tokens"))} |'
              for name, s in splits.items()]
  else:
    lines.append('Document and token counts: not recorded (the workdir held no task.json).')
  done = tr.get('finished')
  lines += ['', '## Training', '',
            f'{_num(facts["step"])} steps trained (of {_num(tr.get("num_steps"))} configured'
            f'{"" if done is None else ", finished" if done else ", not finished"}), batch '
            f'{tr.get("batch_size")} x {tr.get("seq_len")} tokens (documents packed into rows, '
            'each restarting positions and attending within itself), peak learning rate '
            f'{tr.get("learning_rate")}, {tr.get("warmup_steps")} warmup steps then {tr.get("decay")} '
            f'decay, weight decay {tr.get("weight_decay")}, seed {tr.get("seed")}'
            + (f', initialized from `{tr["init_from"]}`' if tr.get('init_from') else '') + '.',
            '', f'Masking: {_masking(facts.get("masking") or {})}', '', '## Results', '']
  metrics = facts.get('metrics')
  if metrics:
    lines += ['Validation at the fixed evaluation masks (from summary.json):', '',
              '| metric | value |', '|---|---|']
    lines += [f'| {k} | {_num(v)} |' for k, v in metrics.items()]
    if facts.get('best'):
      lines += ['', f'Best validation loss {_num(facts["best"]["eval_loss"])} at step '
                f'{facts["best"].get("step")}.']
  else:
    lines.append('Not recorded: the workdir held no summary.json with evaluation metrics.')
  return lines


def _bert_rows(m: dict) -> list[str]:
  """Returns the Model table's architecture rows of a BERT or RoBERTa-PreLayerNorm export."""
  norm = ('pre-LN: before attention and MLP, plus a final LayerNorm' if m.get('pre_layer_norm')
          else 'post-LN (BERT)')
  return [f'| layer norm | {norm} |',
          f'| layers, hidden, heads, MLP | {m["num_layers"]}, {m["hidden_size"]}, '
          f'{m["num_heads"]}, {m["intermediate_size"]} |',
          f'| parameters | {_num(m["parameters"])} |',
          f'| positions, token types | {m["max_position"]}, {m["type_vocab_size"]} |']


def _ordinal(n: int) -> str:
  """Returns n as an English ordinal: 2nd, 3rd, 11th."""
  suffix = 'th' if n % 100 in (11, 12, 13) else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')
  return f'{n}{suffix}'


def _base(theta) -> str:
  """Returns a rotary base for reading: 160,000 rather than 1.6e+05."""
  return _num(int(theta)) if float(theta).is_integer() else _num(theta)


def _modern_rows(m: dict) -> list[str]:
  """Returns the Model table's architecture rows of a ModernBERT export (model.MODERN's options)."""
  every, window = int(m.get('global_every', 1)), int(m.get('local_window', 0))
  if every > 1:
    attention = (f'global in every {_ordinal(every)} layer from layer 0, the others local: a '
                 f'sliding window of {_num(window)} tokens ({_num(window // 2)} on each side)')
    rotary = (f'rotary, base {_base(m["rope_theta"])} in the global layers and '
              f'{_base(m["rope_local_theta"])} in the local ones')
  else:
    attention, rotary = 'global in every layer', f'rotary, base {_base(m["rope_theta"])}'
  mlp = {'geglu': 'GeGLU', 'swiglu': 'SwiGLU'}.get(m.get('mlp_type'), m.get('mlp_type'))
  norm_bias = '' if m.get('norm_bias') else ' without bias'
  biases = ('in attention, MLP and the head transform' if m.get('use_bias') else
            'none in attention, MLP and the head transform (the decoder keeps its bias)')
  rows = [f'| layer norm | pre-LN LayerNorm{norm_bias}: after the embeddings, before attention '
          '(not in layer 0) and the MLP, plus a final one |',
          f'| layers, hidden, heads, MLP | {m["num_layers"]}, {m["hidden_size"]}, '
          f'{m["num_heads"]}, {m["intermediate_size"]} ({mlp}) |',
          f'| attention | {attention} |',
          f'| positions | {rotary}; up to {_num(m["max_position"])} tokens, no token types |',
          f'| biases | {biases} |',
          f'| parameters | {_num(m["parameters"])} |']
  multiple = int(m.get('vocab_multiple', 1))
  if multiple > 1:
    padded = -(-m['vocab_size'] // multiple) * multiple
    rows.append(f'| vocabulary rows | {_num(padded)}: {_num(m["vocab_size"])} ids padded to a '
                f'multiple of {multiple} (no token is a padding row) |')
  return rows


def render(facts: dict) -> str:
  """Returns the model card (README.md with YAML front matter) of the facts."""
  facts = json.loads(dumps(facts))  # the card depends on mlmjax.json's content alone, key order too
  m, t = facts['model'], facts['tokenizer']
  arch = facts['architecture']
  tag = _TAGS.get(arch) or ('roberta-prelayernorm' if m.get('pre_layer_norm') else 'bert')
  lines = ['---', 'library_name: transformers', 'pipeline_tag: fill-mask', 'tags:',
           '- mlmjax', '- fill-mask', '- masked-language-modeling', f'- {tag}', '- jax', '- flax',
           '---', '', f'# {facts["run"]}', '',
           f'A masked language model trained with mlmjax (JAX/Flax), exported as `{arch}` at step '
           f'{_num(facts["step"])}.', '', '## Model', '',
           '| | |', '|---|---|', f'| class | `{arch}` |',
           *(_modern_rows(m) if tag == hf_models.MODERN.model_type else _bert_rows(m)),
           f'| output embedding | {"tied to the input embedding" if m["tie_embeddings"] else "untied"} |',
           f'| tokenizer | {t["kind"]}, {_num(t["vocab_size"])} pieces (sha256 `{t["fingerprint"][:12]}`) |',
           '']
  if facts.get('imported_from'):
    lines += ['## Data and training', '',
              f'Not recorded: the weights were imported from `{facts["imported_from"]}` by '
              'mlmjax.convert and not trained by mlmjax since.']
  else:
    lines += _training_lines(facts)
  lines += ['', '## Provenance', '', *_provenance_lines(facts.get('provenance')), '',
            '## Use with transformers', '', '```python',
            'from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline',
            "tokenizer = AutoTokenizer.from_pretrained('path/to/this/directory')",
            "model = AutoModelForMaskedLM.from_pretrained('path/to/this/directory')",
            "fill = pipeline('fill-mask', model=model, tokenizer=tokenizer)",
            "print(fill('Return the [MASK] of the list.', top_k=5))", '```', '',
            'The tokenizer adds `[CLS]` and `[SEP]` and reads `[MASK]` in text, as mlmjax does. '
            'mlmjax cleans text (ftfy, Unicode normalization) before tokenizing; transformers '
            'does not, so clean input the same way for identical ids. mlmjax\'s fill-mask never '
            'predicts a special token; transformers\' pipeline ranks them too.', '',
            '## Back to mlmjax', '', '```bash',
            'python -m mlmjax.convert import path/to/this/directory --workdir runs/imported', '```',
            '', f'The facts above are in `{FACTS_FILE}`; an export of the imported workdir writes '
            'the same files.']
  return '\n'.join(lines) + '\n'
