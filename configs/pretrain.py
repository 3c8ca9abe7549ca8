"""MLM pretraining configs: get_config('tiny'|'mini'|'small'|'base'|'large')."""

import ml_collections

# Per-size overrides of the defaults below: model shape, batch, schedule.
_SIZES = {
    # Chosen by a measured sweep on 2 CPU cores (README, "Tiny config"; benchmarks/tiny_sweep.py).
    'tiny': dict(model='tiny', vocab_size=8000, seq_len=64, batch_size=16, num_steps=5000,
                 lr=2e-3, warmup=300, eval_every=1000, ckpt_every=1000, dropout=0.0),
    'mini': dict(model='mini', vocab_size=32000, seq_len=128, batch_size=32, num_steps=100_000,
                 lr=1e-3, warmup=2000, eval_every=2000, ckpt_every=2000, dropout=0.1),
    'small': dict(model='small', vocab_size=32000, seq_len=128, batch_size=128, num_steps=200_000,
                  lr=5e-4, warmup=5000, eval_every=5000, ckpt_every=5000, dropout=0.1),
    'base': dict(model='base', vocab_size=32000, seq_len=128, batch_size=256, num_steps=500_000,
                 lr=2e-4, warmup=10_000, eval_every=10_000, ckpt_every=10_000, dropout=0.1),
    'large': dict(model='large', vocab_size=32000, seq_len=128, batch_size=256, num_steps=1_000_000,
                  lr=1e-4, warmup=10_000, eval_every=10_000, ckpt_every=10_000, dropout=0.1),
}


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  """Returns the locked pretraining config for size variant `arg`."""
  if arg not in _SIZES:
    raise ValueError(f"configs/pretrain.py: unknown variant {arg!r}; choose one of {sorted(_SIZES)}")
  s = _SIZES[arg]
  c = ml_collections.ConfigDict()
  c.variant = arg  # which size variant built this config
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
  c.data.cache_dir = ''  # token cache; '' uses $MLMJAX_CACHE or ~/.cache/mlmjax
  c.data.bad_input = 'skip'  # binary/empty files, bad UTF-8, long lines, bad JSONL rows: 'skip' (counted) or 'error'
  c.data.max_line_chars = 1_000_000  # longer lines are bad input (minified data, dumps)
  c.data.prefetch = 2  # batches tf.data prepares ahead

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # an existing sentencepiece .model (or WordPiece vocab.txt / tokenizer.json) to use instead of training one
  c.tokenizer.vocab_size = s['vocab_size']  # pieces, the 5 special ids included
  c.tokenizer.model_type = 'unigram'  # 'unigram' or 'bpe'
  c.tokenizer.character_coverage = 0.9995  # sentencepiece character coverage; the rest byte-fallback
  c.tokenizer.max_sentences = 2_000_000  # lines sampled for training the tokenizer

  c.masking = ml_collections.ConfigDict()
  c.masking.rate = 0.15  # fraction of maskable tokens selected for prediction
  c.masking.split = (0.8, 0.1, 0.1)  # of selected tokens: [MASK], random token, unchanged
  c.masking.selection = 'exact'  # 'exact': round(rate * n) per sequence; 'bernoulli': each token independently
  c.masking.max_predictions = 0  # prediction buffer per sequence; 0 derives it from rate and seq_len
  c.masking.strategy = 'token'  # unit of selection: 'token', 'whole_word', 'span' or 'pmi'; the rate counts tokens
  c.masking.span_p = 0.2  # span: lengths ~ Geometric(span_p) truncated to [1, span_max] (SpanBERT)
  c.masking.span_max = 10  # span: longest span
  c.masking.span_words = True  # span: lengths count whole words (SpanBERT), not tokens
  c.masking.pmi_vocab_size = 10_000  # pmi: n-grams (n = 2..5) with the highest PMI_n, from the token cache
  c.masking.pmi_min_count = 10  # pmi: n-grams seen fewer times are not scored
  c.masking.rate_schedule = 'constant'  # 'constant', 'linear', 'cosine' (rate -> rate_end) or 'step'
  c.masking.rate_end = 0.15  # linear/cosine: the rate reached after rate_steps
  c.masking.rate_steps = 0  # linear/cosine: steps to reach rate_end; 0 = train.num_steps
  c.masking.rate_boundaries = (0,)  # step: steps where the next value starts (ascending)
  c.masking.rate_values = (0.15, 0.15)  # step: one more value than boundaries

  c.model = ml_collections.ConfigDict()
  c.model.size = s['model']  # named shape: tiny, mini, small, base, large, or 'custom' (the four keys below)
  c.model.hidden_size = 0  # > 0 overrides the named size's hidden width (imported checkpoints set it)
  c.model.num_layers = 0  # > 0 overrides the named size's number of transformer blocks
  c.model.num_heads = 0  # > 0 overrides the named size's attention heads
  c.model.intermediate_size = 0  # > 0 overrides the named size's MLP width
  c.model.type_vocab_size = 2  # token-type (segment) embeddings, as BERT
  c.model.layer_norm_eps = 1e-12  # LayerNorm epsilon (BERT's value)
  c.model.tie_embeddings = True  # False: the MLM decoder gets its own output embedding (V x H more)
  c.model.pre_layer_norm = True  # pre-LN (stable at high lr); False is BERT's original post-LN
  c.model.dropout_rate = s['dropout']  # hidden and attention dropout
  c.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
  c.model.max_position = 512  # learned position embeddings
  c.model.attention_impl = ''  # jax.nn.dot_product_attention implementation; '' lets XLA choose
  c.model.remat = ''  # per-block rematerialization: '' none, 'full', 'dots', 'dots_no_batch' (model.REMAT_POLICIES)

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = s['num_steps']  # optimizer steps
  c.train.batch_size = s['batch_size']  # global batch (sequences per step, all hosts together)
  c.train.seq_len = s['seq_len']  # tokens per packed sequence, [CLS]/[SEP] included
  c.train.log_every_steps = 50  # progress line and metrics.jsonl cadence
  c.train.max_wall_minutes = 0.0  # stop (and checkpoint) after this many minutes; 0 = no limit
  c.train.max_skipped_batches = 0  # non-finite steps skipped (no update) before stopping; 0 stops at the first
  c.train.grad_accum_steps = 1  # microbatches per step (batch_size / k rows each), summed into one update

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = s['lr']  # peak learning rate
  c.optim.warmup_steps = s['warmup']  # linear warmup from 0
  c.optim.decay = 'linear'  # after warmup: 'linear' to 0, 'cosine' to 0, or 'constant'
  c.optim.end_lr_fraction = 0.0  # final lr as a fraction of the peak
  c.optim.weight_decay = 0.01  # AdamW decoupled decay, not applied to LayerNorm and biases
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2
  c.optim.eps = 1e-6  # Adam epsilon
  c.optim.grad_clip_norm = 1.0  # global-norm clipping; 0 disables

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (('data', -1), ('fsdp', 1), ('tensor', 1))  # one -1 axis takes the remaining devices

  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = s['ckpt_every']  # save cadence (and always at the end)
  c.ckpt.max_to_keep = 3  # newest checkpoints kept
  c.ckpt.async_save = True  # write in the background while training continues

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = s['eval_every']  # validation cadence (and always at the end)
  c.eval.rate = 0.15  # fixed evaluation masking rate, whatever the training rate
  c.eval.split = (0.8, 0.1, 0.1)  # fixed evaluation corruption split, whatever the training split
  c.eval.num_batches = 50  # validation batches per evaluation (0 = the whole split)
  c.eval.batch_size = 64  # validation batch size
  c.eval.seed = 1234  # fixed key for validation masks: every evaluation asks the same question
  c.eval.at_start = False  # also evaluate before the first step (DAPT and fine-tuning: the starting point)
  c.eval.other_corpus = ''  # mlm: a second held-out corpus evaluated beside the first (DAPT: the original domain)
  c.eval.other_name = 'original'  # its metrics are logged as eval_<name>/...

  # jax.distributed: empty/0/-1 leaves a value to $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
  # $JAX_PROCESS_ID, then to JAX's cluster detection (automatic on a multi-host TPU VM).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''  # 'host:port' of process 0; '' = environment / auto-detect
  c.distributed.num_processes = 0  # processes in the run; 0 = environment / auto-detect
  c.distributed.process_id = -1  # this process's index; -1 = environment / auto-detect
  c.distributed.initialization_timeout = 300  # seconds to wait for every process to connect

  c.init_from = ''  # workdir or checkpoint to initialize the encoder (and tokenizer) from: DAPT, fine-tuning
  c.task = 'mlm'  # what train.py trains: 'mlm' here; configs/finetune.py sets classify, tag or retrieve

  # Early stopping on a validation metric; the best evaluation's checkpoint is kept in best/.
  c.early_stop = ml_collections.ConfigDict()
  c.early_stop.metric = ''  # validation metric to follow, e.g. 'accuracy'; '' = the task's default (mlm: loss)
  c.early_stop.mode = ''  # 'min' or 'max'; '' = the task's default for its metric
  c.early_stop.patience = 0  # stop after this many evaluations without improvement; 0 = never stop
  c.early_stop.min_delta = 0.0  # an improvement smaller than this does not count
  c.lock()
  return c
