"""Checks that README.md stays a short front door and that its links and the docs/ pages hold."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = ROOT / 'docs'
README_MAX_LINES = 250

# [text](target) and [text](target "title"); images too. Targets with a scheme are external.
_LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_FENCE = re.compile(r'^(```|~~~).*?^\1', re.MULTILINE | re.DOTALL)


def _relative_links(page: pathlib.Path) -> list[str]:
  """Returns the relative link targets of a Markdown page, outside code blocks, without #anchors."""
  text = _FENCE.sub('', page.read_text(encoding='utf-8'))
  targets = []
  for target in _LINK.findall(text):
    if re.match(r'^[a-zA-Z][a-zA-Z0-9+.-]*:', target) or target.startswith('#'):
      continue  # http:, https:, mailto: ..., or an anchor on the same page
    targets.append(target.split('#', 1)[0])
  return targets


def _doc_pages() -> list[pathlib.Path]:
  """Returns docs/*.md, the reference pages the README must link."""
  return sorted(DOCS.glob('*.md'))


def test_readme_is_short():
  lines = README.read_text(encoding='utf-8').splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f'README.md has {len(lines)} lines (at most {README_MAX_LINES}): move reference material '
      'to a page under docs/ and link it')


def test_relative_links_point_to_existing_files():
  broken = []
  for page in [README, *_doc_pages()]:
    for target in _relative_links(page):
      if not (page.parent / target).exists():
        broken.append(f'{page.relative_to(ROOT)}: {target}')
  assert not broken, 'links to missing files:\n' + '\n'.join(broken)


def test_every_docs_page_is_linked_from_the_readme():
  assert _doc_pages(), 'docs/ holds no .md pages'
  linked = {(ROOT / t).resolve() for t in _relative_links(README)}
  missing = [str(p.relative_to(ROOT)) for p in _doc_pages() if p.resolve() not in linked]
  assert not missing, 'docs pages not linked from README.md: ' + ', '.join(missing)
