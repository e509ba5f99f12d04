"""The umT5 tokenizer (``google/umt5-xxl`` files in the Wan2.1 folder) and Wan's prompt cleaning.

Prompts are cleaned as Wan does (ftfy's ``fix_text`` when ftfy is installed, HTML unescaped twice,
whitespace collapsed), then tokenized to exactly ``text_len`` tokens: ``</s>`` appended, padded
with id 0 (``<pad>``), truncated keeping ``</s>`` last.
"""

from __future__ import annotations

import html
import os
import re

import numpy as np

try:  # optional, as in Wan: repairs mojibake; without it the other cleaning steps still run
  import ftfy
except ImportError:  # pragma: no cover - depends on the environment
  ftfy = None


def clean(text: str) -> str:
  """Wan's 'whitespace' cleaning of a prompt."""
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r'\s+', ' ', text).strip()


def load(folder: str):
  """A transformers tokenizer from a local folder (no network access)."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'tokenizer folder not found: {folder}')
  files = set(os.listdir(folder))
  if not files & {'tokenizer.json', 'spiece.model'}:
    raise FileNotFoundError(f'{folder}: no tokenizer.json or spiece.model (the google/umt5-xxl '
                            'tokenizer files)')
  try:
    from transformers import AutoTokenizer
  except ImportError:
    raise ImportError('the umT5 tokenizer needs transformers: pip install -e .') from None
  try:
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
  except Exception as e:  # transformers raises OSError/ValueError/... for broken folders
    raise ValueError(f'{folder}: cannot load the tokenizer ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""})') from None
  if tok.pad_token_id is None or tok.eos_token_id is None:
    raise ValueError(f'{folder}: the tokenizer has no pad or eos token (not a T5 tokenizer?)')
  return tok


def tokenize(tok, prompts: list[str], text_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Cleans and tokenizes prompts.

  Returns:
    ids [B, text_len] int32 (padding = the pad id, 0 for umT5); mask [B, text_len] int32,
    1 for real tokens including ``</s>``.
  """
  enc = tok([clean(p) for p in prompts], padding='max_length', truncation=True,
            max_length=text_len, add_special_tokens=True, return_attention_mask=True)
  ids = np.asarray(enc['input_ids'], np.int32)
  mask = np.asarray(enc['attention_mask'], np.int32)
  if ids.shape != (len(prompts), text_len):
    raise ValueError(f'tokenizer returned shape {ids.shape}, expected {(len(prompts), text_len)}')
  return ids, mask
