"""Named starting points for a TrainConfig: a model size and the training settings that suit it.

A preset gives the defaults that a config file and command-line overrides then change (with_preset); its
model_options are those for the run's model, and the run's own model_options add to them key by key. `tiny` learns
visibly in about five minutes on a 2-core CPU; `gpt2-small` is GPT-2 small (124M parameters, context 1024) for a GPU.
"""

from __future__ import annotations

from lmrt.train.config import settings_over

PRESETS: dict[str, dict] = {
    "tiny": dict(
        context_length=128, batch_size=16, max_steps=2500, learning_rate=2e-3, min_learning_rate=2e-4,
        warmup_steps=100, eval_interval=250, eval_batches=10, sample_interval=500, sample_tokens=200,
        checkpoint_interval=250, weight_decay=0.1,
        model_options={"gpt": dict(n_layer=3, n_head=4, n_embd=128),
                       "lstm": dict(n_layer=1, n_embd=128, hidden_size=256),
                       "seq2seq": dict(d_model=128, n_head=4, n_encoder_layers=2, n_decoder_layers=2,
                                       ffn_dim=512, dropout=0.1)},
    ),
    "gpt2-small": dict(
        context_length=1024, batch_size=16, gradient_accumulation=2, max_steps=5000, learning_rate=6e-4,
        min_learning_rate=6e-5, warmup_steps=200, eval_interval=250, eval_batches=20, sample_interval=1000,
        checkpoint_interval=500, tokenizer="bpe", bpe_vocab_size=8192,
        model_options={"gpt": dict(n_layer=12, n_head=12, n_embd=768),
                       "lstm": dict(n_layer=2, n_embd=768, hidden_size=1536),
                       "seq2seq": dict(d_model=768, n_head=12, n_encoder_layers=6, n_decoder_layers=6,
                                       ffn_dim=3072, dropout=0.1)},
    ),
}


def preset_settings(name: str, model: str) -> dict:
    """The TrainConfig settings of preset `name` for `model` ("gpt", "seq2seq" or "lstm")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    if model not in PRESETS[name]["model_options"]:
        raise ValueError(f"preset {name!r} has no settings for model {model!r}; its models are "
                         f"{', '.join(PRESETS[name]['model_options'])}")
    settings = dict(PRESETS[name])
    settings["model_options"] = dict(settings["model_options"][model])
    return {**settings, "preset": name, "model": model}


def with_preset(settings: dict) -> dict:
    """`settings` over those of the preset they name, if any, for the model they name (default gpt): the preset's
    settings where they give none, and the preset's model_options with theirs added key by key."""
    name = settings.get("preset")
    if name is None:
        return dict(settings)
    return settings_over(preset_settings(name, settings.get("model", "gpt")), settings)
