import pytest

from mmchat import config
from mmchat.errors import ConfigError


def test_repository_config_toml_loads_and_matches_the_defaults(tmp_path):
    from pathlib import Path

    loaded = config.load(Path(__file__).parent.parent / "config.toml", env={})
    defaults = config.Config()
    for section in ("fusion", "generation", "sessions", "limits"):
        assert getattr(loaded, section) == getattr(defaults, section), section
    assert loaded.model.rnn == defaults.model.rnn


def test_every_setting_is_documented_in_config_toml():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "config.toml").read_text()
    for section, cls in config.SECTIONS.items():
        assert f"[{section}]" in text
        for name in cls.__dataclass_fields__:
            if name != "settings":
                assert f"\n{name} = " in text, f"{section}.{name} missing from config.toml"


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nrnn = "lstm"\n[generation]\nmax_new_tokens = 5\n')
    c = config.load(path, env={"MMCHAT_MODEL__RNN": "gru", "MMCHAT_GENERATION__TOP_P": "0.5",
                               "MMCHAT_GENERATION__STOP": "###,END",
                               "MMCHAT_FUSION__CONDITION": "false", "OTHER": "x"})
    assert c.model.rnn == "gru" and c.generation.max_new_tokens == 5
    assert c.generation.top_p == 0.5 and c.generation.stop == ("###", "END")
    assert c.fusion.condition is False


@pytest.mark.parametrize("data, message", [
    ({"model": {"rnn": "transformer"}}, "model.rnn = 'transformer' is not allowed: choose one of"),
    ({"model": {"n_layer": 0}}, "model.n_layer = 0 is not allowed: minimum is 1"),
    ({"model": {"n_layer": "two"}}, "model.n_layer = 'two' is not allowed: expected an integer"),
    ({"generation": {"top_p": 1.5}}, "generation.top_p = 1.5 is not allowed: maximum is 1.0"),
    ({"fusion": {"method": "sum"}}, "fusion.method = 'sum'"),
    ({"fusion": {"condition": "yes"}}, "expected a boolean"),
    ({"model": {"colour": 1}}, "unknown setting model.colour; allowed:"),
    ({"colours": {}}, "unknown config section \\[colours\\]"),
    ({"generation": {"stop": "x"}}, "expected a list of strings"),
    ({"train": {"category_weights": {"digit": -1}}}, "expected a table of numbers >= 0"),
    ({"train": {"category_weights": {"digit": "lots"}}}, "expected a table of numbers >= 0"),
    ({"train": {"category_weights": [1]}}, "expected a table"),
])
def test_bad_values_name_the_key_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict(data, env={})


def test_category_weights_from_file_and_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\ncategory_weights = {digit = 2, spoken = 1.5}\n")
    assert config.load(path, env={}).train.category_weights == {"digit": 2.0, "spoken": 1.5}
    c = config.load(path, env={"MMCHAT_TRAIN__CATEGORY_WEIGHTS": '{"greeting": 0}'})
    assert c.train.category_weights == {"greeting": 0.0}
    assert c.to_dict()["train"]["category_weights"] == {"greeting": 0.0}
    with pytest.raises(ConfigError, match="train.category_weights = 'digit=2'"):
        config.load(path, env={"MMCHAT_TRAIN__CATEGORY_WEIGHTS": "digit=2"})


def test_bad_environment_value_is_named():
    with pytest.raises(ConfigError, match="model.threads = 'many'"):
        config.load(None, env={"MMCHAT_MODEL__THREADS": "many"})


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad, env={})


def test_config_is_frozen_and_replace_validates():
    c = config.Config()
    with pytest.raises(AttributeError):
        c.model.rnn = "gru"
    assert c.replace(model={"rnn": "gru"}).model.rnn == "gru"
    with pytest.raises(ConfigError):
        c.replace(model={"rnn": "nope"})


def test_plugin_tables_become_plugin_settings():
    c = config.from_dict({"plugins": {"enabled": ["image"], "image": {"size": 32}}}, env={})
    assert c.plugins.enabled == ("image",) and c.plugins.settings == {"image": {"size": 32}}


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\ncheckpoint = "models/x"\n')
    c = config.load(path, env={})
    assert c.resolve(c.model.checkpoint) == tmp_path / "models" / "x"
