import pytest

from lmrt.train.presets import PRESETS, with_preset


def test_settings_without_a_preset_stay_as_given():
    assert with_preset({"model": "lstm", "max_steps": 3}) == {"model": "lstm", "max_steps": 3}


@pytest.mark.parametrize("model", ["gpt", "lstm", "seq2seq"])
def test_the_preset_takes_the_model_of_the_settings(model):
    """The preset's model_options are those for the model the settings name, wherever the name came from."""
    settings = with_preset({"preset": "tiny", "model": model})
    assert settings["model"] == model and settings["model_options"] == PRESETS["tiny"]["model_options"][model]


def test_settings_override_the_preset_and_add_model_options():
    settings = with_preset({"preset": "tiny", "max_steps": 3, "model_options": {"dropout": 0.1, "n_layer": 1}})
    assert settings["max_steps"] == 3 and settings["learning_rate"] == PRESETS["tiny"]["learning_rate"]
    assert settings["model_options"] == {"n_layer": 1, "n_head": 4, "n_embd": 128, "dropout": 0.1}


@pytest.mark.parametrize("settings,message", [
    ({"preset": "huge"}, "unknown preset 'huge'; the presets are tiny, gpt2-small"),
    ({"preset": "tiny", "model": "rnn"}, "preset 'tiny' has no settings for model 'rnn'; its models are gpt, lstm, "
                                         "seq2seq"),
])
def test_bad_presets(settings, message):
    with pytest.raises(ValueError, match=message):
        with_preset(settings)
