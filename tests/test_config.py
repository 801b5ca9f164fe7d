import pytest

from isoconv.config import TrainConfig, build_config, list_recipes, load_recipe
from isoconv.errors import ConfigError

XL_TABLE = {"cm-vanilla-noaug": 0.8854, "cm-vanilla": 0.9378, "cm-vanilla-relu": 0.9384, "cm-vanilla-silu": 0.9372,
            "cm-xl-noskip": 0.4868, "cm-xl-skip": 0.9422, "cm-xl": 0.9452}


def test_every_shipped_recipe_builds_a_valid_config():
    names = list_recipes()
    for required in [*XL_TABLE, "convmixer-cifar10-25ep", "convmixer-256-8-k9-p1", "convnext-cifar", "cpu-quick"]:
        assert required in names
    for name in names:
        cfg = build_config(name)
        assert cfg.recipe == name


@pytest.mark.parametrize("name,published", XL_TABLE.items())
def test_xl_table_recipes_carry_the_published_number_and_seed_settings(name, published):
    cfg = build_config(name)
    assert cfg.published["test_top1"] == published
    assert (cfg.epochs, cfg.lr_max, cfg.wd, cfg.ra_n, cfg.ra_m, cfg.seed) == (100, 0.005, 0.01, 2, 12, 1204)
    assert cfg.no_aug == (name == "cm-vanilla-noaug")


def test_reference_25_epoch_recipe_is_the_published_command():
    cfg = build_config("convmixer-cifar10-25ep")
    assert (cfg.epochs, cfg.batch_size, cfg.lr_max, cfg.ra_n, cfg.ra_m, cfg.wd, cfg.scale, cfg.jitter, cfg.reprob) == (
        25, 512, 0.05, 2, 12, 0.005, 1.0, 0.0, 0.0)
    assert cfg.model == "cm-vanilla" and cfg.schedule == "onecycle"


def test_flags_override_recipe_and_none_means_unset():
    cfg = build_config("cm-vanilla", epochs=3, lr_max=None)
    assert cfg.epochs == 3 and cfg.lr_max == 0.005


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown recipe 'cm-vanila'.*cm-vanilla"):
        build_config("cm-vanila")


def test_unknown_key_in_recipe_file_is_named(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch'.*epochs"):
        build_config(str(f))


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("epochs: 3\nlr_max: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_recipe(str(f))


@pytest.mark.parametrize("key,value,fragment", [
    ("epochs", 0, "--epochs must be positive, got 0"),
    ("batch_size", 1, "--batch-size must be at least 2"),
    ("reprob", 1.5, "--reprob must be in [0, 1], got 1.5"),
    ("scale", 0.0, "--scale must be in (0, 1], got 0.0"),
    ("amp", "fp8", "--amp must be one of auto, bf16, fp16, off, got 'fp8'"),
    ("ra_m", 31, "--ra-m must be in 0..30"),
])
def test_invalid_values_are_named(key, value, fragment):
    with pytest.raises(ConfigError) as e:
        build_config(None, **{key: value})
    assert fragment in str(e.value)


def test_model_overrides_map_to_constructor_names():
    cfg = TrainConfig(dim=128, patch=1, kernel=3, skip_period=2, activation="relu")
    assert cfg.model_overrides() == {"dim": 128, "kernel_size": 3, "patch_size": 1, "activation": "relu",
                                     "skip_period": 2}


def test_defaults_learn_at_any_length_and_recipes_set_their_own_schedule_and_batch():
    from isoconv.config import list_recipes, load_recipe

    cfg = build_config(model="cm-cpu", epochs=2)
    assert (cfg.schedule, cfg.batch_size) == ("onecycle-frac", 128)
    for name in list_recipes():  # a recipe's behaviour must not depend on the defaults above
        recipe = load_recipe(name)
        assert "schedule" in recipe and "batch_size" in recipe, name
