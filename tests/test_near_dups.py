"""Near-duplicate grouping, the grouped split, containment of fine-tuning texts, the corpus report."""

import itertools
import math
import re

import numpy as np
import pytest

from mlmjax import input_pipeline as ip, near_dups, schema
from tests.toy import planted

# ---------------------------------------------------------------------------------------------
# shingles


def test_shingles_ignore_whitespace_punctuation_and_case():
  text = planted.TOPICS[10]
  assert near_dups.shingles(text, 8) == near_dups.shingles(planted.whitespace_edit(text), 8)
  assert near_dups.shingles(text, 8) == near_dups.shingles(planted.punctuation_edit(text), 8)
  assert near_dups.shingles('One two three.', 8) == {'one two three'}
  assert near_dups.shingles(' ... ', 8) == set()


def test_word_edit_keeps_the_planned_share():
  for doc in planted.long_docs(5):
    edited = planted.word_edit(doc)
    kept = len(near_dups.shingles(doc, 8) & near_dups.shingles(edited, 8)) / len(near_dups.shingles(doc, 8))
    assert 0.87 <= kept <= 0.93, kept


# ---------------------------------------------------------------------------------------------
# group


def test_planted_near_duplicates_are_grouped_and_unrelated_text_is_not():
  base = planted.long_docs(24)
  half = len(base) // 2
  # Unrelated by construction: the first half of one topic + the second half of another
  # (shares about 50% of its n-grams with each: Jaccard 0.33, containment 0.5).
  def halves(a, b):
    wa, wb = a.split(), b.split()
    return ' '.join(wa[:len(wa) // 2] + wb[len(wb) // 2:])
  edits = [(planted.whitespace_edit, 'whitespace'), (planted.punctuation_edit, 'punctuation'),
           (planted.word_edit, '90% shared')]
  docs, pairs = list(base), []
  for i, doc in enumerate(base):
    edit, _ = edits[i % 3]
    docs.append(edit(doc))
    pairs.append((i, len(docs) - 1))
  mixes = []
  for i in range(half):
    docs.append(halves(base[2 * i], base[2 * i + 1]))
    mixes.append(len(docs) - 1)
  groups = near_dups.group(docs, threshold=0.7)
  for i, j in pairs:
    assert planted.same_group(groups, i, j), (edits[i % 3][1], planted.exact(docs[i], docs[j]))
  for m in mixes:  # a half-and-half document joins neither source's group
    assert groups.sizes.get(int(groups.of[m])) is None, planted.exact(docs[m], docs[(m - 2 * len(base)) * 2])
  for i, j in itertools.combinations(range(len(base)), 2):
    assert not planted.same_group(groups, i, j)
  assert groups.stats()['groups'] == len(base)
  assert groups.stats()['documents_in_groups'] == 2 * len(base)


def test_a_document_inside_a_longer_one_is_grouped():
  a, extra = planted.long_docs(2)
  longer = a + '\n\n' + ' '.join(extra.split()[:len(a.split()) // 2])
  jaccard, inside = planted.exact(a, longer)
  assert jaccard < 0.7 and inside == 1.0  # Jaccard alone would miss it
  groups = near_dups.group([a, extra, longer], threshold=0.7)
  assert planted.same_group(groups, 0, 2) and not planted.same_group(groups, 0, 1)


def test_groups_of_real_text_agree_with_exact_overlap():
  # Every help topic against every other: grouped pairs overlap for real, clearly different ones
  # are never joined directly or through a chain.
  groups = near_dups.group(planted.TOPICS, threshold=0.7)
  assert groups.sizes  # the help topics repeat some sections verbatim ('if' and 'else')
  for i, j in itertools.combinations(range(len(planted.TOPICS)), 2):
    jaccard, inside = planted.exact(planted.TOPICS[i], planted.TOPICS[j])
    if jaccard >= 0.8:
      assert planted.same_group(groups, i, j)
    if planted.same_group(groups, i, j) and groups.sizes[int(groups.of[i])] == 2:
      assert jaccard >= 0.6 or inside >= 0.8, (i, j, jaccard, inside)
    if jaccard < 0.2 and inside < 0.5 and planted.same_group(groups, i, j):
      assert groups.sizes[int(groups.of[i])] > 2  # only a chain through others joins them


def test_threshold_zero_groups_nothing():
  doc = planted.TOPICS[5]
  groups = near_dups.group([doc, planted.whitespace_edit(doc)], threshold=0.0)
  assert groups.stats() == {'groups': 0, 'documents_in_groups': 0, 'largest_group': 1, 'pairs': 0}


def test_group_ids_are_the_smallest_member_and_do_not_depend_on_order():
  base = planted.long_docs(6)
  docs = base + [planted.whitespace_edit(d) for d in base]
  groups = near_dups.group(docs, threshold=0.7)
  assert all(groups.of[i] == i and groups.of[i + 6] == i for i in range(6))
  rev = near_dups.group(docs[::-1], threshold=0.7)
  back = {frozenset(len(docs) - 1 - k for k in np.flatnonzero(rev.of == g)) for g in rev.sizes}
  assert back == {frozenset(np.flatnonzero(groups.of == g).tolist()) for g in groups.sizes}


@pytest.mark.parametrize('key, value', [('near_dups.threshold', 1.5), ('near_dups.threshold', -1),
                                        ('near_dups.ngram', 0), ('near_dups.num_perm', 8),
                                        ('near_dups.containment', 0.0),
                                        ('decontaminate.min_share', -0.1)])
def test_check_names_the_key(key, value):
  data = schema.defaults().data
  section, field = key.split('.')
  with data[section].ignore_type():
    data[section][field] = value
  with pytest.raises(ValueError, match=rf'data\.{section}\.{field}='):
    near_dups.check(data)


# ---------------------------------------------------------------------------------------------
# The grouped split


def test_grouped_split_keeps_groups_together_and_singletons_where_they_were():
  base = planted.long_docs(30)
  docs = base + [planted.whitespace_edit(d) for d in base] + [planted.word_edit(d) for d in base[:10]]
  groups = near_dups.group(docs, threshold=0.7)
  train, val = ip.split_documents(docs, 0.3, groups.of)
  where = {i: 'val' for i in val} | {i: 'train' for i in train}
  for g in groups.sizes:
    assert len({where[i] for i in np.flatnonzero(groups.of == g)}) == 1
  alone_train, alone_val = ip.split_documents(docs, 0.3)
  singles = [i for i in range(len(docs)) if int(groups.of[i]) not in groups.sizes]
  assert all((i in val) == (i in alone_val) for i in singles)
  # Exact-hash splitting alone puts some pair on both sides (the reason for grouping).
  assert any((i in alone_val) != (i + 30 in alone_val) for i in range(30))


def test_a_group_goes_to_validation_with_probability_val_fraction():
  # 3,000 groups of 5: the split of a group is one uniform draw, not the smallest of five (which
  # would send 1 - 0.8^5 = 67% of groups to validation at val_fraction 0.2).
  n, size, fraction = 3000, 5, 0.2
  docs = [f'group {g} member {m}' for g in range(n) for m in range(size)]
  of = np.repeat(np.arange(n) * size, size)
  _, val = ip.split_documents(docs, fraction, of)
  assert len(val) % size == 0
  share = len(val) / size / n
  assert abs(share - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / n)


def test_split_corpus_counts_groups_and_moved_documents():
  base = planted.long_docs(30)
  docs = base + [planted.punctuation_edit(d) for d in base]
  data = schema.defaults().data
  split = ip.split_corpus(docs, 0.3, data.near_dups)
  assert split.stats['groups'] == 30 and split.stats['documents_in_groups'] == 60
  _, alone_val = ip.split_documents(docs, 0.3)
  assert split.stats['moved'] == len(set(split.val) ^ set(alone_val)) > 0
  data.near_dups.threshold = 0.0
  off = ip.split_corpus(docs, 0.3, data.near_dups)
  assert off.val == alone_val and off.stats['groups'] == 0 and off.stats['moved'] == 0


# ---------------------------------------------------------------------------------------------
# Containment of fine-tuning texts


def test_contained_finds_short_texts_inside_long_documents():
  long_a, long_b, other = planted.long_docs(3)
  words_a = long_a.split()
  verse = ' '.join(words_a[40:70])  # 30 words inside long_a
  half = ' '.join(words_a[100:115] + other.split()[200:215])  # half inside long_a
  unseen = ' '.join(other.split()[:30])
  found = near_dups.contained([long_a, long_b], [verse, half, unseen], min_share=0.5)
  assert found.documents.tolist() == [True, False]
  assert found.pairs.tolist() == [[0, 0], [0, 1]]
  assert found.stats() == {'documents': 1, 'of_documents': 2, 'texts': 2, 'of_texts': 3}
  assert found.stats(slice(1, 3)) == {'documents': 1, 'of_documents': 2, 'texts': 1, 'of_texts': 2}
  strict = near_dups.contained([long_a, long_b], [verse, half, unseen], min_share=0.9)
  assert strict.pairs.tolist() == [[0, 0]]


def test_shared_shingles_counts_validation_text_found_in_training():
  a, b, c = planted.long_docs(3)
  stats = near_dups.shared_shingles([a, b], [planted.whitespace_edit(a), c])
  assert stats['documents_90pct_in_train'] == 1
  assert stats['in_train'] == len(near_dups.shingles(a, 8) | (near_dups.shingles(c, 8) & (
      near_dups.shingles(a, 8) | near_dups.shingles(b, 8))))


# ---------------------------------------------------------------------------------------------
# Through prepare_data, the fine-tuning configs, and the report


@pytest.fixture
def planted_corpus(tmp_path):
  """A .txt corpus of 40 help topics, 20 of them twice (punctuation-edited); the 40 as cleaned."""
  base = [' '.join(d.split()) for d in planted.long_docs(40)]
  docs = base + [planted.punctuation_edit(d) for d in base[:20]]
  path = tmp_path / 'planted.txt'
  path.write_text('\n\n'.join(docs) + '\n')  # one document per line, blank lines between
  return path, base


def _on_planted(config, planted_corpus, tmp_path):
  """Returns (the corpus's 40 base documents, config reading the corpus with a cache of its own)."""
  path, base = planted_corpus
  config.data.corpus = str(path)
  config.data.cache_dir = str(tmp_path / 'cache')
  return base, config


def test_prepare_data_groups_before_the_split_and_drops_contaminated_documents(
    tiny_config, planted_corpus, tmp_path):
  base, c = _on_planted(tiny_config, planted_corpus, tmp_path)
  c.data.val_fraction = 0.3
  logs = []
  data = ip.prepare_data(c, tmp_path / 'w1', log=logs.append)
  stats = data.cache.stats['near_duplicates']
  assert (stats['groups'], stats['documents_in_groups']) == (20, 40)
  assert any('near-duplicates:' in line for line in logs)
  # Decontamination: a fine-tuning set whose texts are two of the corpus's topics.
  rows = [{'id': f'r{i}', 'text': ' '.join(base[i].split()[:60]), 'label': 'ab'[i % 2]}
          for i in range(40)]
  spec = planted.finetune_config_file(tmp_path, rows)
  from mlmjax.tasks import texts
  held_out = texts.eval_texts(spec)
  assert 0 < len(held_out) < 40
  logs = []
  dropped = ip.prepare_data(c, tmp_path / 'w2', exclude_texts=held_out, log=logs.append)
  line = next(l for l in logs if l.startswith('decontaminate:'))
  n = int(re.search(r'inside ([\d,]+) of', line).group(1).replace(',', ''))
  assert n >= len(held_out)  # each held-out text is inside its topic (and its edited copy)
  kept = data.cache.stats['train']['documents'] + data.cache.stats['val']['documents']
  assert (dropped.cache.stats['train']['documents'] + dropped.cache.stats['val']['documents']
          == kept - n)
  assert dropped.cache.key != data.cache.key


def test_old_config_json_reads_as_split_without_grouping():
  old = schema.defaults().to_dict()
  del old['data']['near_dups']
  assert schema.upgrade(old).data.near_dups.threshold == 0.0
  assert schema.upgrade(schema.defaults().to_dict()).data.near_dups.threshold == 0.7


def test_mlm_task_drops_documents_holding_texts_of_data_decontaminate_configs(
    tiny_config, planted_corpus, tmp_path):
  from mlmjax import tasks
  base, c = _on_planted(tiny_config, planted_corpus, tmp_path)
  rows = [{'id': f'r{i}', 'text': ' '.join(base[i].split()[:60]), 'label': 'ab'[i % 2]}
          for i in range(20, 40)]  # topics without an edited copy: one document each
  c.data.decontaminate.configs = planted.finetune_config_file(tmp_path, rows)
  from mlmjax.tasks import texts
  held_out = len(texts.eval_texts(c.data.decontaminate.configs))
  stats = tasks.create(c, log=lambda _: None).prepare(tmp_path / 'w').stats
  assert stats['train']['documents'] + stats['val']['documents'] == 60 - held_out
