"""Training data: tokenizers, the embedded default corpus, token files and datasets."""

from lmrt.data.corpus import default_corpus, read_text
from lmrt.data.datasets import LanguageModelWindows, Seq2SeqPairs, split_tokens
from lmrt.data.token_file import read_token_file, write_token_file
from lmrt.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer, tokenizer_from_dict

__all__ = ["BPETokenizer", "ByteTokenizer", "LanguageModelWindows", "Seq2SeqPairs", "Tokenizer", "default_corpus",
           "load_tokenizer", "read_text", "read_token_file", "split_tokens", "tokenizer_from_dict", "write_token_file"]
