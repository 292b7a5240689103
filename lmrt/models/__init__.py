"""Language models on lmrt's layers: GPT, the encoder-decoder Transformer and the LSTM baseline."""

from lmrt.models._common import IGNORE_INDEX, LanguageModel
from lmrt.models.gpt import GPT, GPTConfig
from lmrt.models.lstm import LSTMConfig, LSTMLanguageModel
from lmrt.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

__all__ = ["GPT", "GPTConfig", "IGNORE_INDEX", "LSTMConfig", "LSTMLanguageModel", "LanguageModel", "Seq2SeqConfig",
           "Seq2SeqTransformer"]
