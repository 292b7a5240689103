import pytest

from lmrt.train.config import TrainConfig, parse_overrides


def test_file_then_overrides(tmp_path):
    (tmp_path / "run.toml").write_text('model = "lstm"\nbatch_size = 8\n[model_options]\nhidden_size = 64\n')
    (tmp_path / "run.yaml").write_text("model: lstm\nbatch_size: 8\nmodel_options: {hidden_size: 64}\n")
    for name in ("run.toml", "run.yaml"):
        config = TrainConfig.from_file(tmp_path / name)
        assert (config.model, config.batch_size, config.model_options) == ("lstm", 8, {"hidden_size": 64})
        assert config.learning_rate == TrainConfig().learning_rate  # left out: the default
    config = TrainConfig().with_overrides(["batch-size=4", "learning_rate=3e-4", "compile=true", "max_minutes=none",
                                           'model_options={"n_layer": 2}', "data=notes.txt"])
    assert (config.batch_size, config.learning_rate, config.compile, config.max_minutes) == (4, 3e-4, True, None)
    assert config.model_options == {"n_layer": 2} and config.data == "notes.txt"


def test_later_overrides_win():
    assert parse_overrides(["max_steps=5", "batch_size=2", "max_steps=7"]) == {"max_steps": 7, "batch_size": 2}


def test_round_trip_through_a_dict():
    config = TrainConfig(model="seq2seq", model_options={"d_model": 64}, max_minutes=5.0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert "model_options" in str(config) and "'seq2seq'" in str(config)


@pytest.mark.parametrize("override,message", [
    ("batch_size=0", "`batch_size` must be >= 1, got 0"),
    ("model=transformer", "`model` must be one of gpt, seq2seq, lstm, got 'transformer'"),
    ("batch_size=eight", r"override batch_size='eight': invalid literal"),
    ("compile=maybe", "override compile='maybe': expected true or false"),
    ("lr=1e-3", "override 'lr=1e-3' must be key=value with a TrainConfig setting as key"),
    ("model_options=[1]", "expected a JSON object"),
    ("min_learning_rate=1", "need 0 <= min_learning_rate <= learning_rate"),
    ("validation_fraction=0", r"`validation_fraction` must be in \(0, 1\), got 0.0"),
    ("learning_rate=0", "`learning_rate` must be > 0, got 0.0"),
    ("weight_decay=-1", "`weight_decay` must be >= 0, got -1.0"),
    ("beta1=1.5", r"`beta1` must be in \[0, 1\), got 1.5"),
    ("beta2=-0.1", r"`beta2` must be in \[0, 1\), got -0.1"),
    ("sample_tokens=0", "`sample_tokens` must be >= 1, got 0"),
    ("bpe_vocab_size=0", "`bpe_vocab_size` must be >= 259, got 0"),
    ("backend=nope", "`backend` must be one of triton, cuda, cpp, torch or None .*, got 'nope'"),
    ("learning_rate=inf", "`learning_rate` must be a finite number, got inf"),
    ("grad_clip=nan", "`grad_clip` must be a finite number, got nan"),
    ("max_minutes=inf", "`max_minutes` must be a finite number, got inf"),
    ("model=seq2seq context_length=3", "`context_length` must be >= 4 for model seq2seq .*, got 3"),
    ("seed=18446744073709551616", r"`seed` must be in \[-2\*\*63, 2\*\*64\) \(torch.manual_seed's range\), got "
                                  "18446744073709551616"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig().with_overrides(override.split())


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("model = \n")
    with pytest.raises(ValueError, match="bad.toml is malformed"):
        TrainConfig.from_file(tmp_path / "bad.toml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping of settings, got list"):
        TrainConfig.from_file(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("batchsize: 3\n")
    with pytest.raises(ValueError, match="unknown setting 'batchsize'"):
        TrainConfig.from_file(tmp_path / "typo.yaml")
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(ValueError, match=r"must end in .yaml, .yml or .toml"):
        TrainConfig.from_file(tmp_path / "run.json")


def test_file_values_are_read_as_their_settings_types(tmp_path):
    """YAML reads 3e-4 and quoted values as strings; they are converted as --set converts them. A value of the
    wrong type is refused naming the setting, not left to fail as a traceback mid-run."""
    (tmp_path / "run.yaml").write_text("learning_rate: 3e-4\ntensorboard: 'false'\ncompile: 'no'\nmax_minutes: 2\n")
    config = TrainConfig.from_file(tmp_path / "run.yaml")
    assert (config.learning_rate, config.tensorboard, config.compile, config.max_minutes) == (3e-4, False, False, 2)
    for text, message in [("max_steps = 'x'", r"run.toml: max_steps='x': invalid literal"),
                          ("max_steps = 2.5", "`max_steps` must be an integer, got 2.5"),
                          ("batch_size = true", "`batch_size` must be an integer, got True"),
                          ("preset = 3", "`preset` must be a string or None, got 3"),
                          ("model_options = 3", "`model_options` must be a mapping, got 3")]:
        (tmp_path / "run.toml").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_file(tmp_path / "run.toml")
