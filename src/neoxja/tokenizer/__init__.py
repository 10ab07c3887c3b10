"""GPT-NeoX-Japanese tokenizer: the reference's exact ids, lossless decoding, and a fast encoder.

How text becomes ids (this is the behaviour of Japanese-BPEEncoder_V2, which the checkpoints were
trained with, and of transformers' ``GPTNeoXJapaneseTokenizer``):

1. The text is split around special tokens written in it (``<|endoftext|>`` stays one id); every
   other piece is encoded on its own.
2. Fixed rewrites: space and U+3000 -> ``<SP>``, CRLF/LF/CR -> ``<BR>``, tab -> ``<TAB>``, ``—`` and
   ``−`` -> ``ー``; then each emoji (``emoji.json``, in file order) -> its group tag ``<|emojiN|>``;
   with ``do_clean_text`` URLs, e-mail addresses, phone numbers, dates, prices and box-drawing runs
   become ``<URL>``, ``<EMAIL>``, ``<TEL>``, ``<DATE>``, ``<PRICE>``, ``<BLOCK>``.
3. Segmentation, left to right: at ``<`` the longest vocabulary word of 3+ characters wins,
   anywhere else the smallest id among the vocabulary words of the next 1-3 characters; a
   character without one becomes ``<KIGOU>``, ``<U2000U2BFF>`` or its UTF-8 byte tokens.

Speed comes from doing the same thing with less work: the fixed rewrites are C-level
``str.replace`` calls; emoji are replaced in one pass with the reference's key-by-key result; the
``do_clean_text`` patterns are searched with linear-time scanners (the reference's regular
expressions backtrack quadratically on long digit runs); and step 3 runs in a small C extension,
``neoxja._segment``, with a Python fallback that gives the same ids. Decoding joins byte tokens
across tokens, so characters outside the vocabulary come back intact, and keeps spaces;
:func:`normalize` says exactly what comes back.

Modules: ``vocab`` (files, special tokens, id tables), ``rewrite`` (step 2: fixed rewrites and
emoji), ``clean`` (``do_clean_text``), ``segment`` (step 3), ``detokenize`` (ids -> text),
``batch`` (``__call__``, padding, truncation, worker processes, pickling), ``core`` (the class).
"""

from neoxja.tokenizer.batch import BatchEncoding
from neoxja.tokenizer.clean import clean_text
from neoxja.tokenizer.core import GPTNeoXJapaneseTokenizer
from neoxja.tokenizer.detokenize import normalize
from neoxja.tokenizer.vocab import VERY_LARGE_INTEGER, VOCAB_FILES, load_emoji, load_vocab

__all__ = [
    "VERY_LARGE_INTEGER",
    "VOCAB_FILES",
    "BatchEncoding",
    "GPTNeoXJapaneseTokenizer",
    "clean_text",
    "load_emoji",
    "load_vocab",
    "normalize",
]
