"""The run config schema: every key with its default (`defaults`), and old config.json layouts (`upgrade`).

defaults() is the complete set of keys every run config has (configs/*.py only set values), with
the `tiny` pretraining values. upgrade() is the one place that knows older layouts of a workdir's
config.json: renamed keys, and what a missing key meant; everything else reads configs with plain
attribute access.
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

# Old dotted key -> new dotted key (the flat masking keys became sections).
RENAMED: dict[str, str] = {
    'masking.span_p': 'masking.span.p',
    'masking.span_max': 'masking.span.max',
    'masking.span_words': 'masking.span.words',
    'masking.pmi_vocab_size': 'masking.pmi.vocab_size',
    'masking.pmi_min_count': 'masking.pmi.min_count',
    'masking.rate_schedule': 'masking.schedule.kind',
    'masking.rate_end': 'masking.schedule.end',
    'masking.rate_steps': 'masking.schedule.steps',
    'masking.rate_boundaries': 'masking.schedule.boundaries',
    'masking.rate_values': 'masking.schedule.rates',
}


def defaults() -> ml_collections.ConfigDict:
  """Returns the unlocked ConfigDict of every run config key with its default (the tiny values)."""
  c = ml_collections.ConfigDict()
  c.variant = 'tiny'  # which size variant (or fine-tuning preset) built this config
  c.seed = 0  # every random choice (init, data order, masks, dropout) derives from this

  c.data = ml_collections.ConfigDict()
  c.data.corpus = 'pydocs'  # 'pydocs' (embedded), a .txt/.jsonl path or glob (comma-separated), or 'tfds:NAME'
  c.data.text_field = 'text'  # field holding the text in .jsonl rows and TFDS examples
  c.data.tfds_split = 'train'  # TFDS split to read
  c.data.tfds_data_dir = ''  # TFDS data_dir; '' uses TFDS's default
  c.data.tfds_download = False  # allow TFDS to download (only where the network reaches its buckets)
  c.data.max_documents = 0  # keep the first N documents after cleaning; 0 keeps all
  c.data.min_chars = 40  # drop documents shorter than this after cleaning
  c.data.fix_text = True  # repair mojibake and HTML entities with ftfy
  c.data.normalization = 'NFC'  # Unicode normalization form: NFC, NFKC, or '' for none
  c.data.dedup = True  # drop exact duplicate documents
  c.data.val_fraction = 0.05  # fraction of documents held out for validation (by content hash)
  c.data.passage_chars = 0  # cut longer documents into passages of at most this many characters; 0 = whole documents
  # Near-duplicates share a split: MinHash over word n-grams, grouped at this Jaccard (mlmjax/near_dups.py).
  c.data.near_dups = ml_collections.ConfigDict()
  c.data.near_dups.threshold = 0.7  # estimated Jaccard of two documents' n-gram sets; 0 turns grouping off
  c.data.near_dups.containment = 0.9  # or this share of the smaller document's n-grams inside the larger
  c.data.near_dups.ngram = 8  # words per shingle
  c.data.near_dups.num_perm = 128  # MinHash permutations (the estimate's sd is sqrt(J(1-J)/num_perm))
  # Pretraining documents that hold a fine-tuning val/test text are dropped (python -m mlmjax.corpus_report).
  c.data.decontaminate = ml_collections.ConfigDict()
  c.data.decontaminate.configs = ''  # fine-tuning configs, comma-separated: 'configs/finetune.py:bbc'; '' = none
  c.data.decontaminate.min_share = 0.5  # share of a text's n-grams a document must hold to be dropped
  c.data.cache_dir = ''  # token cache; '' uses $MLMJAX_CACHE or ~/.cache/mlmjax
  c.data.bad_input = 'skip'  # binary/empty files, bad UTF-8, long lines, bad JSONL rows: 'skip' (counted) or 'error'
  c.data.max_line_chars = 1_000_000  # longer lines are bad input (minified data, dumps)
  c.data.prefetch = 2  # batches tf.data prepares ahead
  c.data.shard_chars = 16_000_000  # mlmjax.prepare: a shard takes documents until it holds this many characters
  c.data.prepared = ''  # train from this mlmjax.prepare build directory (built there when missing); '' = the token cache
  c.data.mixture = ''  # train from several prepare builds, 'DIR:WEIGHT,DIR:WEIGHT' (weights normalized); '' = none
  c.data.side_table_tokens = 10_000_000  # token slots (rows x seq_len) of the seeded uniform sample of training rows the n-gram baselines and PMI count; 0 = all rows

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # an existing sentencepiece .model (or WordPiece vocab.txt / tokenizer.json) to use instead of training one
  c.tokenizer.vocab_size = 8000  # pieces, the 5 special ids included
  c.tokenizer.model_type = 'unigram'  # 'unigram' or 'bpe'
  c.tokenizer.character_coverage = 0.9995  # sentencepiece character coverage; the rest byte-fallback
  c.tokenizer.max_sentences = 2_000_000  # lines sampled for training the tokenizer
  c.tokenizer.sample_chars = 100_000_000  # mlmjax.prepare trains on documents (a hash-drawn sample) of this many characters; 0 = all
  # DAPT: add up to N pieces learned from data.corpus's training split after the ids of init_from's
  # (or tokenizer.path's) unigram tokenizer; their embeddings start as their old pieces' mean.
  c.tokenizer.extend_pieces = 0

  c.masking = ml_collections.ConfigDict()
  c.masking.rate = 0.15  # fraction of maskable tokens selected for prediction (the schedule's start)
  c.masking.split = (0.8, 0.1, 0.1)  # of selected tokens: [MASK], random token, unchanged
  c.masking.selection = 'exact'  # 'exact': round(rate * n) per sequence; 'bernoulli': each token independently
  c.masking.max_predictions = 0  # prediction buffer per sequence; 0 derives it from rate and seq_len
  c.masking.dynamic = True  # fresh masks every step; False: static masks from each row's content
  c.masking.static_patterns = 1  # dynamic=False: fixed masks per row (BERT's duplication factor)
  c.masking.strategy = 'token'  # unit of selection: 'token', 'whole_word', 'span' or 'pmi'; the rate counts tokens
  c.masking.span = ml_collections.ConfigDict()
  c.masking.span.p = 0.2  # span: Geometric(p) lengths, mean 3.8; 3.5 as selected at seq_len 128
  c.masking.span.max = 10  # span: longest span
  c.masking.span.words = True  # span: lengths count whole words (SpanBERT), not tokens
  c.masking.pmi = ml_collections.ConfigDict()
  c.masking.pmi.vocab_size = 10_000  # pmi: n-grams (n = 2..5) with the highest PMI_n, from data.side_table_tokens's sample
  c.masking.pmi.min_count = 10  # pmi: n-grams seen fewer times are not scored
  c.masking.schedule = ml_collections.ConfigDict()
  c.masking.schedule.kind = 'constant'  # 'constant', 'linear', 'cosine' (rate -> end) or 'step'
  c.masking.schedule.end = 0.15  # linear/cosine: the rate reached after `steps`
  c.masking.schedule.steps = 0  # linear/cosine: steps to reach `end`; 0 = train.num_steps
  c.masking.schedule.boundaries = (0,)  # step: steps where the next value starts (ascending)
  c.masking.schedule.rates = (0.15, 0.15)  # step: the rates, one more than boundaries

  # The encoder's fields (model.EncoderConfig, less vocab_size): EncoderConfig(vocab_size=V, **model).
  c.model = ml_collections.ConfigDict()
  c.model.size = 'tiny'  # named shape (model.SIZES: tiny..large, modern_*), or 'custom' (the four keys below)
  c.model.hidden_size = 0  # > 0 overrides the named size's hidden width (imported checkpoints set it)
  c.model.num_layers = 0  # > 0 overrides the named size's number of transformer blocks
  c.model.num_heads = 0  # > 0 overrides the named size's attention heads
  c.model.intermediate_size = 0  # > 0 overrides the named size's MLP width
  c.model.max_position = 512  # rows of the learned position table (the longest row it can take)
  c.model.type_vocab_size = 2  # token-type (segment) embeddings, as BERT; 0: none (ModernBERT)
  c.model.dropout_rate = 0.0  # hidden dropout (embeddings, attention output, MLP output)
  # Attention-probability dropout: follows dropout_rate (also after overrides of it) unless set.
  c.model.attention_dropout_rate = c.model.get_oneway_ref('dropout_rate')
  c.model.layer_norm_eps = 1e-12  # LayerNorm epsilon (BERT's value)
  c.model.pre_layer_norm = True  # pre-LN (stable at high lr); False is BERT's original post-LN
  c.model.tie_embeddings = True  # False: the MLM decoder gets its own output embedding (V x H more)
  c.model.initializer_range = 0.02  # truncated-normal std of the weights, as BERT
  c.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
  c.model.attention_impl = ''  # '' (jax chooses), 'xla', 'cudnn', 'reference' (dense einsum) or 'splash' (TPU Pallas)
  c.model.remat = ''  # per-block rematerialization: '' none, 'full', 'dots', 'dots_no_batch' (model.REMAT_POLICIES)
  # Architecture options, BERT's by default; configs/pretrain.py:modern_* sets ModernBERT's (model.MODERN).
  c.model.position_embedding = 'learned'  # 'learned' (a table of max_position rows) or 'rope' (rotary)
  c.model.rope_theta = 10000.0  # rotary base of the global-attention layers (ModernBERT: 160000)
  c.model.rope_local_theta = 10000.0  # rotary base of the sliding-window layers
  c.model.mlp_type = 'gelu'  # 'gelu' (dense, GELU, dense), or gated 'geglu' / 'swiglu'
  c.model.norm = 'layernorm'  # 'layernorm' or 'rmsnorm'
  c.model.norm_bias = True  # the norms' additive bias (ModernBERT: none)
  c.model.use_bias = True  # biases of the attention, MLP and head-transform layers (the decoder's stays)
  c.model.global_every = 1  # layer i attends globally when i % global_every == 0, else through the window
  c.model.local_window = 0  # window of local layers: keys at most local_window // 2 positions away
  c.model.first_attention_norm = True  # False: layer 0 attends to the embedding norm's output (ModernBERT)
  c.model.vocab_multiple = 1  # embedding rows padded to a multiple (64 for matmul tiles); logits keep the vocabulary

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 5000  # optimizer steps
  c.train.batch_size = 16  # global batch (sequences per step, all hosts together)
  c.train.seq_len = 64  # tokens per packed sequence, [CLS]/[SEP] included
  c.train.log_every_steps = 50  # progress line and metrics.jsonl cadence
  c.train.max_wall_minutes = 0.0  # stop (and checkpoint) after this many minutes; 0 = no limit
  c.train.max_skipped_batches = 0  # non-finite steps skipped (no update) before stopping; 0 stops at the first
  c.train.grad_accum_steps = 1  # microbatches per step (batch_size / k rows each), summed into one update
  c.train.z_loss = 0.0  # mlm: adds z_loss * mean(logsumexp(logits)^2) over the predicted positions (PaLM's 1e-4)
  # Budget-tied runs: the budget sets train.num_steps, so the schedule ends annealed when it runs out.
  c.train.budget_tokens = 0  # > 0: train.num_steps = this many tokens / (batch_size * seq_len), phases included
  c.train.budget_minutes = 0.0  # > 0: train.num_steps that these minutes of steps afford at the measured step time
  c.train.batch_warmup_steps = 0  # > 0: the batch grows from batch_warmup_from, doubling, to batch_size over these steps
  c.train.batch_warmup_from = 0  # the first batch size of the batch warmup (batch_size halved until it fits)

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = 'adamw'  # 'adamw', 'lamb' (layer-wise trust ratio) or 'stable_adamw' (AdamW with update clipping)
  c.optim.learning_rate = 2e-3  # peak learning rate
  c.optim.warmup_steps = 300  # linear warmup from 0
  c.optim.decay = 'linear'  # after warmup: 'linear', 'cosine' or '1-sqrt' down to the end lr, or 'constant'
  c.optim.decay_steps = 0  # decay over the last N steps, the peak held before (warmup-stable-decay); 0 = all after warmup
  c.optim.decay_fraction = 0.0  # > 0 instead of decay_steps: decay over this fraction of train.num_steps (tiny: 0.25)
  c.optim.end_lr_fraction = 0.0  # final lr as a fraction of the peak
  c.optim.weight_decay = 0.01  # AdamW decoupled decay, not applied to LayerNorm and biases
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2
  c.optim.eps = 1e-6  # Adam epsilon
  c.optim.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  c.optim.ema_decay = 0.0  # > 0 keeps an EMA of the parameters (e.g. 0.999), evaluated beside them as eval_ema/*

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (('data', -1), ('fsdp', 1), ('tensor', 1))  # one -1 axis takes the remaining devices

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 1000  # save cadence (and always at the end)
  c.ckpt.max_to_keep = 3  # newest checkpoints kept
  c.ckpt.keep_every = 0  # milestones: also keep every step divisible by N, and step 0's weights; 0 = off
  c.ckpt.async_save = True  # write in the background while training continues
  c.ckpt.restart_if_unrestorable = False  # checkpoints exist, none restores: True starts over

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 1000  # validation cadence (and always at the end)
  c.eval.rate = 0.15  # fixed evaluation masking rate, whatever the training rate
  c.eval.split = (0.8, 0.1, 0.1)  # fixed evaluation corruption split, whatever the training split
  c.eval.num_batches = 50  # validation batches per evaluation (0 = the whole split)
  c.eval.batch_size = 64  # validation batch size
  c.eval.seed = 1234  # fixed key for validation masks: every evaluation asks the same question
  c.eval.at_start = False  # also evaluate before the first step (DAPT and fine-tuning: the starting point)
  c.eval.other_corpus = ''  # mlm: a second held-out corpus evaluated beside the first (DAPT: the original domain)
  c.eval.other_name = 'original'  # its metrics are logged as eval_<name>/...

  # Weights & Biases: metrics and settings also go to a W&B run when the wandb package is installed
  # and a project is named; TensorBoard and metrics.jsonl are written either way.
  c.wandb = ml_collections.ConfigDict()
  c.wandb.project = ''  # W&B project; '' = no W&B run
  c.wandb.entity = ''  # W&B team or user; '' = wandb's default
  c.wandb.name = ''  # run name; '' = the workdir's name
  c.wandb.mode = ''  # 'online', 'offline' (sync later with `wandb sync`), or '' = wandb's default ($WANDB_MODE)

  # jax.distributed: empty/0/-1 leaves a value to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
  # $JAX_PROCESS_ID, then to JAX's cluster detection (automatic on a multi-host TPU VM).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''  # 'host:port' of process 0; '' = environment / auto-detect
  c.distributed.num_processes = 0  # processes in the run; 0 = environment / auto-detect
  c.distributed.process_id = -1  # this process's index; -1 = environment / auto-detect
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to connect

  # Phases of one run: each a dict ending at a step ('until'; the last ends at train.num_steps)
  # and overriding train.seq_len, train.batch_size or masking.* keys (dotted) for its steps:
  # ({'until': 4500, 'train.seq_len': 64}, {'until': 5000, 'masking.rate': 0.15}). The optimizer
  # and schedule carry across boundaries; evaluation stays at the run's own seq_len and masks.
  c.phases = ()

  c.init_from = ''  # workdir or checkpoint to initialize the encoder (and tokenizer) from: DAPT, fine-tuning
  c.task = 'mlm'  # what train.py trains: mlm, classify, regress, tag, retrieve (mlmjax/tasks/)

  # Early stopping on a validation metric; the best evaluation's checkpoint is kept in best/.
  c.early_stop = ml_collections.ConfigDict()
  c.early_stop.metric = ''  # validation metric to follow, e.g. 'accuracy'; '' = the task's default (mlm: loss)
  c.early_stop.mode = ''  # 'min' or 'max'; '' = the task's default for its metric
  c.early_stop.patience = 0  # stop after this many evaluations without improvement; 0 = never stop
  c.early_stop.min_delta = 0.0  # an improvement smaller than this does not count

  # Fine-tuning data (classify, tag, retrieve): one JSON Lines file, split by hash.
  c.task_data = ml_collections.ConfigDict()
  c.task_data.path = ''  # JSON Lines file, 'embedded:NAME', 'pairs:FILE' or 'tfds:NAME'
  c.task_data.text_field = 'text'  # classify: the text
  c.task_data.text_b_field = ''  # classify/regress: text pairs [CLS] a [SEP] b [SEP]; '' = one text
  c.task_data.title_field = ''  # classify: a field prepended to the text ('' = none)
  c.task_data.label_field = 'label'  # classify: the class name
  c.task_data.tokens_field = 'tokens'  # tag: the list of words
  c.task_data.tags_field = 'tags'  # tag: one tag per word
  c.task_data.query_field = 'query'  # retrieve: the query text
  c.task_data.document_field = 'document'  # retrieve: the text to find
  c.task_data.id_field = 'id'  # splits hash this field; '' hashes the example's content
  c.task_data.group_field = ''  # examples sharing this field's value stay in one split (e.g. 'doc')
  c.task_data.val_fraction = 0.1  # share of examples (or groups) for validation, by hash
  c.task_data.test_fraction = 0.1  # share for the final test, by hash
  c.task_data.max_examples = 0  # keep the first N examples of the file; 0 keeps all
  c.task_data.tag_map = ''  # tag: '' keeps the tags as they are; 'brown_coarse' (README)
  c.task_data.tfds_test_split = 'validation'  # tfds: the test split; 'train' gives train and val

  c.classify = ml_collections.ConfigDict()
  # Sentence vector: 'mean' over tokens, or 'cls' (the [CLS] hidden state). MLM pretraining here
  # has no sentence-level task, so [CLS] is not trained to summarize (docs/results.md).
  c.classify.pooling = 'mean'
  c.classify.positive_label = ''  # also report 'f1', this label's F1 (GLUE MRPC, QQP); '' = none

  c.retrieve = ml_collections.ConfigDict()
  c.retrieve.pooling = 'mean'  # embedding: 'mean' over tokens or 'cls'
  c.retrieve.temperature = 0.05  # softmax temperature of the in-batch-negatives loss (cosine scores)
  c.retrieve.num_candidates = 0  # evaluation candidates: the split's first N documents; 0 = all
  return c


# ---------------------------------------------------------------------------------------------
# Old config.json layouts.


def flatten(raw: Mapping, prefix: str = '') -> dict[str, Any]:
  """Returns {dotted key: value} of the leaves of a nested mapping (an empty one has none)."""
  flat = {}
  for key, value in raw.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _like(value: Any, default: Any) -> Any:
  """Returns value with lists made tuples wherever the default is a tuple (recursively)."""
  if isinstance(default, tuple) and isinstance(value, (list, tuple)):
    inner = default[0] if default else None
    return tuple(_like(v, inner) for v in value)
  return value


def _node_and_field(config: ml_collections.ConfigDict, key: str):
  """Returns (section, field name) of dotted key in config, or None when config lacks it."""
  *sections, field = key.split('.')
  node = config
  for s in sections:
    if s not in node or not isinstance(node[s], ml_collections.ConfigDict):
      return None
    node = node[s]
  if field not in node or isinstance(node[field], ml_collections.ConfigDict):
    return None
  return node, field


def _add(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets dotted key in config, creating its sections; a clash with a non-section is skipped."""
  *sections, field = key.split('.')
  node = config
  for s in sections:
    if s not in node:
      node[s] = ml_collections.ConfigDict()
    if not isinstance(node[s], ml_collections.ConfigDict):
      return
    node = node[s]
  if field not in node:
    node[field] = tuple(value) if isinstance(value, list) else value


def _upgrade(raw: Mapping) -> tuple[ml_collections.ConfigDict, list[str]]:
  if hasattr(raw, 'to_dict'):
    raw = raw.to_dict()
  flat = {RENAMED.get(k, k): v for k, v in flatten(raw).items()}
  # What a missing key meant: attention dropout was the hidden dropout; no near-duplicate grouping;
  # a linear/cosine schedule without an end stayed at masking.rate.
  if 'model.attention_dropout_rate' not in flat and 'model.dropout_rate' in flat:
    flat['model.attention_dropout_rate'] = flat['model.dropout_rate']
  if 'data.near_dups.threshold' not in flat and 'data.corpus' in flat:
    flat['data.near_dups.threshold'] = 0.0  # the split hashed each document alone
  if 'masking.schedule.end' not in flat and 'masking.rate' in flat:
    flat['masking.schedule.end'] = flat['masking.rate']
  # Values older code read as "unset": no task was MLM; attention_impl None let XLA choose.
  if 'task' in flat and not flat['task']:
    flat['task'] = 'mlm'
  if flat.get('model.attention_impl', '') is None:
    flat['model.attention_impl'] = ''
  config, unknown = defaults(), []
  for key, value in flat.items():
    where = _node_and_field(config, key)
    if where is None:  # e.g. the section of a task from outside mlmjax: kept as it is
      unknown.append(key)
      _add(config, key, value)
      continue
    node, field = where
    value = _like(value, node[field])
    try:
      node[field] = value  # casts an int to a float field, as a config override does
    except TypeError:
      with node.ignore_type():  # a wrong type stays visible to config_check, which names the key
        node[field] = value
  config.lock()
  return config, sorted(unknown)


def upgrade(raw: Mapping) -> ml_collections.ConfigDict:
  """Returns the locked config of a workdir's config.json (a nested dict) of any age.

  Starts from defaults(), renames old keys (RENAMED), fills what a missing key meant, and overlays
  every known key's value (lists become tuples where the default is a tuple). Keys the schema does
  not know are kept as they are (a task from outside mlmjax has its own sections): unknown_keys(raw)
  lists them. Nothing is rejected here; check_config
  (mlmjax/config_check.py) names wrong types and values.
  """
  return _upgrade(raw)[0]


def unknown_keys(raw: Mapping) -> list[str]:
  """Returns the sorted dotted keys of raw that the schema does not know (upgrade keeps them)."""
  return _upgrade(raw)[1]
