import pytest
import yaml

from iclevr_diffusion.config import PRESETS, Config, config_from_dict, load_config, parse_override, valid_keys
from iclevr_diffusion.errors import IclevrError


def test_defaults_equal_default_preset():
    """The dataclass defaults are the CPU preset, so `train` and `train -c default` agree."""
    assert load_config("default").to_dict() == Config().to_dict()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg.name == name


def test_seed_preset_is_the_reports_model():
    cfg = load_config("seed")
    assert cfg.model.block_out_channels == [32, 64, 96, 128]
    assert cfg.model.attention == [False, True, True, True]
    assert cfg.model.layers_per_block == 2
    assert (cfg.schedule.beta_schedule, cfg.schedule.beta_start, cfg.schedule.beta_end) == ("linear", 1e-4, 0.02)
    assert cfg.schedule.num_train_timesteps == 1000


def test_precedence_defaults_file_set_flags(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.001, "batch_size": 8}, "seed": 3}))
    cfg = load_config(path, ["train.lr=1e-4", "model.block_out_channels=[32, 64, 64]"], {"train.batch_size": 4})
    assert cfg.name == "my"
    assert cfg.seed == 3  # from the file
    assert cfg.train.lr == pytest.approx(1e-4)  # --set beats the file
    assert cfg.train.batch_size == 4  # a flag beats both
    assert cfg.model.block_out_channels == [32, 64, 64]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(IclevrError) as err:
        load_config(None, ["train.lrr=1"])
    msg = str(err.value)
    assert "Unknown config key 'train.lrr'" in msg and "Did you mean 'train.lr'" in msg
    assert "train.batch_size" in msg and "\n" not in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(IclevrError, match=r"bad\.yaml: Unknown config key 'train\.epochz'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.batch_size=abc", "train.batch_size' must be int"),
        ("train.batch_size=1.5", "must be int"),
        ("train.hflip=1", "Unknown config key"),
        ("data.hflip=yes-please", "must be bool"),
        ("sample.sampler=eulr", "choose one of: ddpm, ddim, dpm\\+\\+, unipc, heun, euler, dpm\\+\\+sde"),
        ("sample.sampler=ddim", "not a sampler of schedule.formulation=flow; choose one of: heun, euler"),
        ("model.attention=[true]", "one true/false per level"),
        ("model.cross_attention=[true]", "model.cross_attention has 1 entries.*or \\[\\] for none"),
        ("model.cross_attention=[true,true,false]", "leaves out a level with self-attention"),
        ("train.batch_size=0", "must be positive"),
        ("train.adam_beta2=1", "train.adam_beta2' must be in \\(0, 1\\)"),
        ("noequals", "section.key=value"),
    ],
)
def test_bad_values_fail_clearly(override, match):
    with pytest.raises(IclevrError, match=match):
        load_config(None, [override])


def test_int_accepted_for_float_and_null_for_optional():
    cfg = load_config(None, ["train.lr=1", "train.max_minutes=null", "train.max_steps=10"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_minutes is None and cfg.train.max_steps == 10


def test_parse_override_reads_scientific_notation():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("data.root=/x/y") == ("data.root", "/x/y")


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(IclevrError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(IclevrError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_dict():
    cfg = load_config("seed", ["train.lr=3e-4"])
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_valid_keys_cover_every_section():
    keys = valid_keys()
    for section in ("data.", "model.", "schedule.", "train.", "sample.", "eval."):
        assert any(k.startswith(section) for k in keys)


def test_no_stays_a_string():
    """YAML 1.1 reads `no` as false; mixed_precision's 'no' must survive --set and files alike."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["data.hflip=true"]).data.hflip is True
