"""PTB tokenisation as the COCO caption evaluation (pycocoevalcap) does it.

pycocoevalcap's `PTBTokenizer` runs each caption, one per line, through
Stanford CoreNLP 3.4.1 (`PTBTokenizer -preserveLines -lowerCase`) and then
drops the tokens in its `PUNCTUATIONS` list. `ptb_tokenize` does the same in
pure Python: a longest-match lexer (ties go to the earlier rule, as in JFlex)
whose rules reproduce what that jar outputs, then lowercasing, then the filter.
The rules were checked against the jar itself:

  "Don't do it, it's John's dog!"  -> do n't do it it 's john 's dog
  "I cannot (won't) pay $5..."     -> i can not -lrb- wo n't -rrb- pay $ 5

Quirks of the original that are kept: the filter runs after lowercasing, so
brackets stay as '-lrb-', '-rrb-', '-lsb-', ...; '?!', '!!!', '-----' stay;
abbreviations keep their period ('mr.', 'u.s.', 'etc.', a single letter 'a.');
'dog.cat' is one token; '1 1/2' is one token '1\u00a01/2' (CIDEr's
`str.split` splits it again); characters outside the Basic Multilingual
Plane (emoji) are deleted.

Agreement: all 41,504 COCO captions of coco-caption's example results give
the jar's tokens but one, and so do ~99% of those captions with 1-4 random
punctuation marks inserted. Known differences:
  - CoreNLP lexes a whole batch of captions as one text, so the end of one
    caption can depend on the start of the next: 'a sign with a P.' gives
    'p' if the next caption starts with 'A', 'The', 'She', ... (a sentence
    end) and 'p.' otherwise. We give 'p.' (as with no next caption). This
    is almost every remaining difference.
  - Three-part phone numbers with two spaces ('555 555 1234') are split;
    a few odd forms ("o'o", 'x-e.g.y') are lexed differently.
  - Combining marks other than U+0300-U+036F split words (use NFC text).
"""

from collections.abc import Callable
import functools
import re
import unicodedata

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, compared after lowercasing.
PUNCTUATIONS = frozenset(["''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-',
                          '-RCB-', '.', '?', '!', ',', ':', '-', '--', '...',
                          ';'])

_A = "['\u0092\u2019]"  # An apostrophe.
_AE = "['\u0091\u0092\u2018\u2019\u201b]"  # Also those found inside words.
_NUMERIC = '\u00b2\u00b3\u00b9\u00bc-\u00be\u2150-\u218f'  # Not letters: ½ ²
_L = f'(?:[^\\W\\d_{_NUMERIC}]|[\u0300-\u036f])'  # A letter.
_LD = f'(?:[^\\W_{_NUMERIC}]|[\u0300-\u036f])'  # A letter or a digit.
_HYPHEN = '[-_\u058a\u2010\u2011]'
_OLD = f'(?:[dDoOlL]{_AE}{_LD})'  # The o'c of o'clock, d'y of d'ye.
_THING = f'{_OLD}?{_LD}+(?:{_HYPHEN}{_OLD}?{_LD}+)*'  # well-known, 5pm.
_DOTTED = f'{_L}{_LD}*(?:[.!?@]{_L}{_LD}*)+'  # cat.dog, yahoo!com, a@b
_ACRO = r'[A-Za-z](?:\.[A-Za-z])+'  # u.s
_HTHING = rf'[A-Za-z0-9][A-Za-z0-9.,]*(?:-(?:[A-Za-z0-9]+|{_ACRO}\.))+'
_THINGA = r'[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+'  # AT&T, Q&A
_REDAUX = f'{_A}(?:[msdMSD]|(?i:re|ve|ll))'  # 's 'm 'd 're 've 'll
_SREDAUX = f'[nN]{_AE}[tT]'  # n't
# Abbreviations that keep their period, matched case-insensitively. Those of
# the first list hold on to it even when a letter follows ('dec.k').
_ABBREVS_STICKY = (
    r'jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|'
    r'fri|ala|ariz|calif|colo|conn|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|'
    r'mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo|inc|cos?|corp|pp?tys?|ltd|'
    r'plc|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|ed\.d|ph\.d|jr|sr|'
    r'bros|blvd|rd|rt|esq|etc|al|seq')
_ABBREVS = (
    r'dept|invt|elec|natl|m[ft]g|ph|ft|mrs?|ms|drs?|profs?|sens?|reps?|attys?|'
    r'lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|mt|capt|ste?|ave|pres|'
    r'lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ens|vs|alex|wm|jos|cie|'
    r'a\.k\.a|cf|treas')
_CASED_ABBREVS = ('A(?i:rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|'
                  'O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash)')  # 'Ill.', not 'ill.'
# After 'I.' (any single letter) these words mean a sentence ended: 'i', '.'.
_SENTENCE_STARTS = '|'.join(
    word[0] + f'(?i:{word[1:]})' for word in (
        'About According Additionally After An A As At But Earlier He Her Here '
        'However If In It Last Many More Mr. Ms. Now Once One Other Our She '
        'Since So Some Such That The Then There These They This We When While '
        'What Yet You').replace('.', r'\.').split())
_QUOTE_MAP = str.maketrans({
    '"': "''", '\u0091': '`', '\u2018': '`', '\u201b': '`', '\u2039': '`',
    '\u0092': "'", '\u2019': "'", '\u203a': "'", '\u0093': '``',
    '\u201c': '``', '\u00ab': '``', '\u0094': "''", '\u201d': "''",
    '\u00bb': "''"})
_SYMBOLS = {  # Fractions, currencies and entities that CoreNLP rewrites.
    '\u00bc': '1/4', '\u00bd': '1/2', '\u00be': '3/4', '\u2153': '1/3',
    '\u2154': '2/3', '\u00a2': 'cents', '\u00a3': '#', '\u00a4': '$',
    '\u0080': '$', '\u20a0': '$', '\u20ac': '$', '&amp;': '&', '&lt;': '<',
    '&gt;': '>', '&quot;': "''", '&nbsp;': None, '&mdash;': '--',
    '&ndash;': '--'}
_BRACKETS = str.maketrans({'(': '-LRB-', ')': '-RRB-', '[': '-LSB-',
                           ']': '-RSB-', '{': '-LCB-', '}': '-RCB-'})

Emit = str | Callable[[str], str | None] | None


def _keep_symbol(char: str) -> str | None:
  """A character no rule knows: kept if a BMP symbol, else deleted."""
  if ord(char) > 0xffff or unicodedata.category(char)[0] not in 'SPN':
    return None
  return char


def _hyphens(text: str) -> str:
  return '--' if 3 <= len(text) <= 4 else text


# (pattern, trailing context or None, emit). The longest pattern + context
# wins (JFlex counts the context), the earlier rule on ties; only the pattern
# is consumed. emit: None keeps the text, a str replaces it, a callable maps
# it (returning None deletes the token).
_RULE_SPECS: list[tuple[str, str | None, Emit]] = [
    ('(?i:can)', '(?i:not)', None),  # can|not, gon|na, got|ta, gim|me
    ('(?i:gon|wan)', '(?i:na)', None),
    ('(?i:got)', '(?i:ta)', None),
    ('(?i:gim|lem)', '(?i:me)', None),
    (r'</?[A-Za-z!][^>\s]*>', None, None),  # SGML tags.
    ('[\u2013\u2014\u2015\u0096\u0097]', None, '--'),
    ('&(?:amp|lt|gt|quot|nbsp|mdash|ndash);', None, _SYMBOLS.get),
    ('[\u00bc-\u00be\u2153-\u215e\u00a2-\u00a5\u0080\u20a0\u20ac]', None,
     lambda s: _SYMBOLS.get(s, s)),
    (f'{_L}+', _REDAUX, None),  # it|'s
    ('[A-Za-z]*[A-MO-Za-mo-z]', _SREDAUX, None),  # do|n't
    (f'{_L}+', None, None),
    (f"{_A}[nN]{_A}?", None, None),  # 'n' and the words below keep their '.
    (f'[lLdDjJ]{_A}|(?i:dunkin|somethin|ol){_A}', None, None),
    (f"{_A}(?i:em|till?|cause)|{_A}[2-9]0(?i:s)", None, None),
    (f'[A-HJ-XZn]{_AE}{_L}{{2,}}', None, None),  # O'Neill
    (f'{_L}+[aeiouyAEIOUY]{_AE}[aeiouA-Z]{_L}*', None, None),  # ma'am
    ("(?i:cont'd\\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)",
     None, None),
    (f'[yY]{_A}', _L, None),  # y'|all
    ("'[tT]", '(?i:is|was)', None),  # 't|is
    (r'https?://[^\s"<>|()]*[^\s"<>|.!?(){},-]', None, None),
    (r'www\.(?:[^\s"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}'
     r'(?:/[^\s"<>|()]*[^\s"<>|.!?(){},-])?', None, None),
    (r'[a-zA-Z0-9][^\s"<>|()]*@[^\s"<>|().]+(?:\.[^\s"<>|().]+)*', None,
     None),  # Emails, a@b
    (_REDAUX, '[^A-Za-z]', lambda s: s.translate(_QUOTE_MAP)),
    (_SREDAUX, None, lambda s: s.translate(_QUOTE_MAP)),
    (r'\d{1,2}[-/]\d{1,2}[-/]\d{2,4}', None, None),  # Dates.
    (r'[-+]?\d*(?:[.:,\u066b\u066c]\d+)+', None, None),  # 1,000 12:30
    (r'[-+]?\d+', None, None),
    (r'(?:\d{1,4}[- ])?\d{1,4}(?:\\?/|\u2044)\d{1,4}', None,
     lambda s: s.replace(' ', '\u00a0')),  # 7/8, '5 7/8' as one token.
    (r'(?:\(\d{3}\) ?|\d{3}[- .])\d{3}[- .]\d{4}', None,
     lambda s: s.replace(' ', '\u00a0').translate(_BRACKETS)),  # Phones.
    (f'(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\\.d\\.s|pro-|anti-|'
     f's&(?:amp;)?p-500|s&(?:amp;)?ls|cap{_A}n|c{_A}est|c\\+\\+|c#|f#)',
     None, lambda s: s.replace('&amp;', '&')),
    (r'[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2})'
     r'{1,2}', None, None),  # and/or
    (r'[A-Z]*\$|#', None, None),
    (f'#{_L}+|@[A-Za-z_][A-Za-z0-9_]*', None, None),  # #tags @names
    (f'{_ACRO}\\.', None, None),  # Abbreviations keep their period.
    (f'(?i:{_ABBREVS_STICKY})\\.|(?:{_CASED_ABBREVS})\\.', '.', None),
    (f'(?i:{_ABBREVS})\\.', None, None),
    (r'[A-Za-z]\.', None, None),
    (r'[A-Za-z]', rf'\.[ \t\u00a0]+(?:{_SENTENCE_STARTS})[ \t\u00a0]', None),
    (r'(?i:nos?|prop)\.', r'[ \t\u00a0]*\d', None),  # No.|5
    (_ACRO, r'\s', None),
    (f"{_A}[0-9][0-9]", r'\s', None),  # '90
    (f'{_L}+\\.', '[,;:]', None),  # dog.|,
    (f'{_HTHING}\\.', '[,;:]', None),
    (f'{_THING}\\.', '[,;:]', None),
    (f'{_DOTTED}\\.', '[,;:]', None),
    (f'{_THINGA}\\.', '[,;:]', lambda s: s.replace('&amp;', '&')),
    (r"[<>]?[:;=]['\-oO]?[()\[\]DPdpO\\|]", '[^A-Za-z0-9]',
     lambda s: s.replace('(', '-LRB-').replace(')', '-RRB-')),  # :-)
    (r'\^_\^|-_-', None, None),
    ('"', None, "''"),
    (r'[+%&\u2030\u2031~^|\\<>=/]', None, None),
    (r'[()\[\]{}]', None, lambda s: s.translate(_BRACKETS)),
    ('-+', None, _hyphens),
    ('\\.{3,5}|[\u0085\u2026]', None, '...'),
    (r'@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:]|[?!]+|[.\u00a1\u00bf]', None, None),
    (_HTHING, None, None),
    (_DOTTED, None, None),
    (_THING, None, None),
    (_THINGA, None, lambda s: s.replace('&amp;', '&')),
    ("'", r'[A-Za-z][^\s]', '`'),  # An opening quote.
    (_REDAUX, None, lambda s: s.translate(_QUOTE_MAP)),
    (f"''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e"
     f"\u201f\u2039\u203a\u00ab\u00bb]{{1,2}}|{_A}", None,
     lambda s: s.translate(_QUOTE_MAP)),
    ('.', None, _keep_symbol),
]
_RULES = [(re.compile(p), re.compile(c) if c else None, e)
          for p, c, e in _RULE_SPECS]
_PLAIN_WORD = re.compile(  # Letters only, not can|not, gon|na, ...
    f'(?!(?i:cannot|gonna|wanna|gotta|gimme|lemme)$){_L}+')
_SPACE = re.compile('[\\s\u200b\u200e\u200f\ufeff]+')


def _longest_match(text: str, pos: int) -> tuple[int, Emit]:
  """End of the winning rule's match at `pos`, and its emit."""
  best_total, best_end, best_emit = 0, pos + 1, _keep_symbol
  for pattern, context, emit in _RULES:
    match = pattern.match(text, pos)
    if match is None or match.end() == pos:
      continue
    end = total = match.end()
    if context is not None:
      after = context.match(text, end)
      if after is None:
        continue
      total = after.end()
    if total > best_total:
      best_total, best_end, best_emit = total, end, emit
  return best_end, best_emit


@functools.lru_cache(maxsize=1 << 16)
def _lex_chunk(chunk: str, following: str) -> tuple[tuple[str, ...], int]:
  """CoreNLP tokens of a whitespace-free chunk (not yet lowercased).

  Args:
    chunk: the chunk.
    following: the next chunk, plus a space if more follow. Trailing contexts
      look into it ('No.' + ' 5', 'I.' + ' The '), and the only patterns
      with a space (fractions '5 7/8', phone numbers) may run into it.

  Returns:
    The tokens, and how many characters of `following` they consumed.
  """
  text = f'{chunk} {following}'
  tokens, pos = [], 0
  while pos < len(chunk):
    end, emit = _longest_match(text, pos)
    token = text[pos:end]
    if callable(emit):
      token = emit(token)
    elif emit is not None:
      token = emit
    if token:
      tokens.append(token)
    pos = end
  return tuple(tokens), max(pos - len(chunk) - 1, 0)


def ptb_tokenize(text: str) -> list[str]:
  """Tokens of `text` as pycocoevalcap's PTBTokenizer gives them.

  Args:
    text: one caption (newlines count as spaces, as in pycocoevalcap).

  Returns:
    The lowercased PTB tokens, without those in `PUNCTUATIONS`; e.g.
    "A dog's toy." -> ['a', 'dog', "'s", 'toy']. A few tokens hold a
    no-break space ('1\u00a01/2'), as CoreNLP's do.
  """
  text = text.replace('\u00ad', '')  # CoreNLP deletes soft hyphens.
  chunks = [chunk for chunk in _SPACE.split(text) if chunk]
  tokens, consumed = [], 0
  for i, chunk in enumerate(chunks):
    chunk, following = chunk[consumed:], ''
    consumed = 0
    if not chunk:
      continue
    if _PLAIN_WORD.fullmatch(chunk):
      tokens.append(chunk)  # The fast path, for most words.
      continue
    if i + 1 < len(chunks) and (chunk[-1] in '.)' or chunk[-1].isdigit()):
      # Only these can look past their end ('No.', 'I.', '5 7/8'); all other
      # chunks share cache entries whatever follows them.
      following = chunks[i + 1] + (' ' if i + 2 < len(chunks) else '')
    chunk_tokens, consumed = _lex_chunk(chunk, following)
    tokens.extend(chunk_tokens)
  lowered = (token.lower() for token in tokens)
  return [token for token in lowered if token not in PUNCTUATIONS]
