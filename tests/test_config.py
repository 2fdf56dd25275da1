"""One reader of config files (config.py) with one error type naming the file, table and key; the options train
and lora share declared once, their help stating the dataclasses' defaults."""

from __future__ import annotations

import tomllib
from inspect import signature
from pathlib import Path

import pytest
import click
import typer
from typer.testing import CliRunner

from biomass_cache.cli import app
from biomass_cache.common.config import read_config
from biomass_cache.common.errors import ConfigError
from biomass_cache.common.errors import DataError
from biomass_cache.submit.spec import load_ensemble
from biomass_cache.extract.config import load_config_file
from biomass_cache.cli.lora import lora_command
from biomass_cache.lora.settings import LoraSettings, load_settings
from biomass_cache.cli.options import TRAIN_OPTIONS, default_of, shown
from biomass_cache.store.reduce import CONFIG_KEYS as REDUCE_DEFAULTS
from biomass_cache.store.reduce import load_settings as reduce_settings
from biomass_cache.train.config import TrainConfig, load_config
from biomass_cache.cli.train import train_command
from biomass_cache.train.tune_space import parse_space
from toys import ROOT

LOADERS = {
    "train": load_config,
    "extract": load_config_file,
    "lora": lambda p: load_settings(p, {}),
    "reduce": reduce_settings,
    "ensemble": load_ensemble,
    "space": parse_space,
}
MEMBER = '[[member]]\npath = "runs/a"\n'


@pytest.mark.parametrize("loader, body, fragments", [
    ("train", "[train]\nepoch = 3\n", ["c.toml [train]: unknown key(s) ['epoch']"]),
    ("train", '[train]\n[[train.sweep]]\nname = "x"\nepochs = 3\n', ["c.toml [[train.sweep]] #1: unknown key(s) "
                                                                    "['epochs']"]),
    ("train", "[train]\nlr = -1\n", ["c.toml: lr must be a number > 0, got -1 ([train] lr)"]),
    ("train", '[train]\nfull = "false"\n', ["c.toml: full must be true or false, got 'false' ([train] full)"]),
    ("train", "[train]\npreload = 0\n", ["c.toml: preload must be true, false or 'auto', got 0 ([train] preload)"]),
    ("train", "[train]\nstack_folds = 1\n", ["c.toml: stack_folds must be true, false or 'auto', got 1"]),
    ("train", "[train]\nlayers = [3, 3]\n", ["c.toml: layers must be a list of distinct block indices"]),
    ("train", '[train]\n[[train.sweep]]\nname = "x"\nlr = "fast"\n',
     ["c.toml: member 'x': lr must be a number > 0, got 'fast' ([train.sweep] lr)"]),
    ("train", "train = 3\n", ["c.toml train: must be a table", "got 3"]),
    ("train", "[trian]\nepochs = 1\n", ["c.toml: unknown table [trian]; did you mean [train]?"]),
    ("train", "epochs = 1\n[train]\nlr = 0.1\n", ["c.toml: key(s) ['epochs'] sit outside any table"]),
    ("train", "epochs = 1\n", ["c.toml: key(s) ['epochs'] sit outside any table", "[train] here"]),
    ("extract", "[extracts]\nviews = 2\n", ["c.toml: unknown table [extracts]; did you mean [extract]?"]),
    ("lora", "[lora]\nrank = 4\n[ensemble]\n", ["c.toml: unknown table [ensemble]; a config file holds"]),
    ("lora", "rank = 4\n", ["c.toml: key(s) ['rank'] sit outside any table"]),
    ("reduce", "[reduse]\ndim = 3\n", ["c.toml: unknown table [reduse]; did you mean [reduce]?"]),
    ("extract", "[extract]\nbogus = 1\n", ["c.toml [extract]: unknown key(s) ['bogus']"]),
    ("extract", "[extract]\nviews = 0\n", ["c.toml: views must be an integer >= 1, got 0 ([extract] views)"]),
    ("extract", '[extract]\nviews = "4"\n', ["c.toml: views must be an integer >= 1, got '4' ([extract] views)"]),
    ("extract", '[extract]\nsize = "960x470"\n', ["c.toml: size must be WxH or [W, H], positive multiples of 16",
                                                  "got '960x470' ([extract] size)"]),
    ("extract", '[extract]\ndtype = "float32"\n', ["c.toml: dtype must be one of", "got 'float32' ([extract] dtype)"]),
    ("extract", "[extract]\ndata_dir = 5\n", ["c.toml: data_dir must be a folder, got 5 ([extract] data_dir)"]),
    ("extract", "[extract]\nout = [1]\n", ["c.toml: out must be a .zarr folder, got [1] ([extract] out)"]),
    ("extract", "[extract]\ndim = 8\npool = 2\n",
     ["c.toml: ['dim', 'pool'] set the reduction in the pass, which needs"]),
    ("extract", "dim = 8\n", ["c.toml: ['dim'] set the reduction in the pass"]),
    ("extract", '[extract]\npolicy = "strong"\n', ["c.toml: policy must be a table of ViewPolicy", "got 'strong'"]),
    ("extract", "[extract]\npolicy = { p_hflip = 2 }\n", ["c.toml: policy must be a table of ViewPolicy",
                                                          "{'p_hflip': 2} ([extract] policy)"]),
    ("extract", "[extract]\npolicy = { hflip = 0.5 }\n", ["c.toml: policy must be a table of ViewPolicy"]),
    ("extract", '[extract]\npolicy = { p_blur = "x" }\n', ["c.toml: policy must be a table of ViewPolicy"]),
    ("lora", '[extract]\nprecision = "half"\n', ["c.toml: precision must be one of", "([extract] precision)"]),
    ("lora", "[lora]\nrnk = 8\n", ["c.toml [lora]: unknown key(s) ['rnk']"]),
    ("lora", "[lora]\nrank = 0\n", ["c.toml: rank must be an integer >= 1, got 0 ([lora] rank)"]),
    ("lora", "[extract]\nlayers = []\n", ["c.toml: layers must be a list of block indices, got [] ([extract] layers)"]),
    ("reduce", "[reduce]\ndims = 3\n", ["c.toml [reduce]: unknown key(s) ['dims']"]),
    ("reduce", "[reduce]\ndim = 1.5\n", ["c.toml [reduce]: ['dim'] must be whole numbers"]),
    ("ensemble", "aggregate = 'mean'\n" + MEMBER, ["c.toml: unknown key(s) ['aggregate']"]),
    ("ensemble", MEMBER + "wieght = 2\n", ["c.toml: member #1 has unknown key(s) ['wieght']"]),
    ("ensemble", "stack_alpha = -1\n" + MEMBER, ["c.toml: stack_alpha must be a finite number >= 0, got -1"]),
    ("space", "[spaces]\n", ["c.toml: unknown section(s) ['spaces']"]),
    ("space", '[space]\nprecision = { choice = ["fp32", "fp16"] }\n',
     ["c.toml: [space] precision can take 'fp16': precision must be"]),
    ("space", "[space]\nema_decay = { uniform = [0.9, 1.5] }\n", ["c.toml: [space] ema_decay can take 1.5"]),
    ("space", "[space]\neval_every = { int = [1, 10] }\n", ["c.toml [space]: eval_every cannot be searched"]),
    ("space", "[space]\ninterval_bins = { int = [0, 2] }\n", ["c.toml: [space] interval_bins can take 1"]),
    ("space", "[space]\nepochs = { int = [0, 8], log = true }\n", ["int with log = true needs low >= 1, got 0"]),
    ("space", '[space]\nmixup = { choice = [1, true] }\n', ["c.toml: [space] mixup can take 1: mixup must be"]),
    ("space", "[space]\nlearning_rate = { uniform = [0.1, 0.2] }\n", ["c.toml: unknown key(s) ['learning_rate']"]),
])
def test_every_loader_names_the_file_and_key(tmp_path, loader, body, fragments):
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        LOADERS[loader](path)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, DataError)  # the CLI's user error: one `error:` line


def test_the_flat_form_is_extract_keys_alone(tmp_path):
    """A file of keys outside any table is read by extract, checked key by key; the other loaders refuse it."""
    path = tmp_path / "c.toml"
    path.write_text("views = 2\npolicy = { p_hflip = 0.25 }\n")  # a table-valued key is no table of the file
    assert load_config_file(path) == {"views": 2, "policy": {"p_hflip": 0.25}}
    path.write_text("epochs = 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochs'\]"):
        load_config_file(path)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_refuses_an_unreadable_file(tmp_path, loader):
    path = tmp_path / "c.toml"
    path.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"c.toml: not a valid TOML .*file \(.*line 1"):
        LOADERS[loader](path)
    with pytest.raises(ConfigError, match=r"gone.toml: .*file not found"):
        LOADERS[loader](tmp_path / "gone.toml")


def test_the_suffix_is_checked_where_the_option_takes_a_toml_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("[train]\n")
    with pytest.raises(ConfigError, match=r"c.txt: --config takes a TOML file .*not a .txt file"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"c.txt: --config takes a .toml or .json file"):
        load_config_file(path)
    assert reduce_settings(path) == {}  # `biomass reduce --config` never checked the name


def test_the_shipped_configs_load_as_before():
    """Every section a loader hands out is the file's table as tomllib reads it."""
    for name in ("cpu_demo.toml", "reference_vit7b.toml"):
        path = ROOT / "configs" / name
        doc = tomllib.loads(path.read_text())
        train, sweep, extract = load_config(path)
        assert (train, sweep, extract) == ({k: v for k, v in doc["train"].items() if k != "sweep"},
                                           doc["train"].get("sweep", []), doc["extract"])
        assert load_config_file(path) == {"reduce": True, **doc["reduce"], **doc["extract"]}  # reduced in the pass
        assert reduce_settings(path) == doc["reduce"] and set(doc["reduce"]) <= set(REDUCE_DEFAULTS)
        s = load_settings(read_config(path), {})
        assert s.backbone == doc["extract"]["backbone"] and s.layers == doc["extract"]["layers"]
    assert len(load_ensemble(ROOT / "configs" / "ensemble_example.toml").members) == 2
    assert len(parse_space(ROOT / "configs" / "tune_example.toml").params) == 6


def test_a_bad_config_is_one_error_line_naming_the_file(tmp_path):
    (tmp_path / "c.toml").write_text("[lora]\nrank = 0\n")
    result = CliRunner().invoke(app, ["lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                                      "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'c.toml'}: rank must be an integer >= 1, "
                                                      "got 0 ([lora] rank)")
    assert not (tmp_path / "run").exists()


def test_extract_names_the_file_for_its_values_and_the_flag_for_flags(tmp_path):
    (tmp_path / "c.toml").write_text("[extract]\nviews = 0\n")
    where = ["extract", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t.zarr")]
    from_file = CliRunner().invoke(app, [*where, "--config", str(tmp_path / "c.toml")])
    assert from_file.exit_code == 2 and from_file.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'c.toml'}: views must be an integer >= 1, got 0 ([extract] views)")
    from_flag = CliRunner().invoke(app, [*where, "--views", "0"])
    assert from_flag.exit_code == 2 and from_flag.stderr.strip().splitlines()[-1] == (
        "error: invalid extraction settings: views must be an integer >= 1, got 0 (--views or [extract] views)")
    assert not (tmp_path / "t.zarr").exists()


def _params(name: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.get_command(click.Context(group), name).params}


def test_train_and_lora_share_their_options():
    train, lora = _params("train"), _params("lora")
    shared = set(TRAIN_OPTIONS) - {"cache", "data"}
    assert shared <= set(train) and shared <= set(lora)
    for name in shared:
        t, l = train[name], lora[name]
        assert (t.opts, t.secondary_opts, t.default, t.help) == (l.opts, l.secondary_opts, l.default, l.help), name
    for name in shared:  # the very same declaration, not a copy
        assert signature(train_command).parameters[name].default is TRAIN_OPTIONS[name]
        assert signature(lora_command).parameters[name].default is TRAIN_OPTIONS[name]
    tune = _params("tune")
    assert (tune["cache"].help, tune["data"].help) == (train["cache"].help, train["data"].help)


def test_help_states_the_dataclass_defaults():
    train, lora = _params("train"), _params("lora")
    # by hand, from TrainConfig / LoraSettings
    for params, name, text in [(train, "batch_size", "(16"), (lora, "batch_size", "(16"), (train, "lr", "(0.004)"),
                               (train, "epochs", "(120)"), (train, "pcgrad", "(on;"), (train, "ema", "(on)"),
                               (train, "mixup", "(off)"), (lora, "lora_rank", "(8)"), (lora, "lora_lr", "(0.0001)"),
                               (lora, "size", "(448x224)"), (lora, "layers", "(5,8,11)"), (lora, "head", "(density)")]:
        assert text in params[name].help, (name, params[name].help)
    # every option that overrides a setting with a default: its help states that default
    lora_fields, train_fields = set(LoraSettings.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    checked = 0
    for command, params in [("train", train), ("lora", lora)]:
        for name, p in params.items():
            field = name.removeprefix("lora_")
            lora_setting = name != field or (field in lora_fields and name not in TRAIN_OPTIONS)
            cls = (LoraSettings if command == "lora" and lora_setting else TrainConfig if field in train_fields
                   else None)
            if cls is None or p.default is not None or default_of(cls, field) is None:
                continue  # not a setting (--out, --folds-csv), a switch (--full), no default (--lora-prefix-cache)
            assert f"({shown(default_of(cls, field))}" in p.help, (command, name, p.help)
            checked += 1
    assert checked == 19 + 35  # train: 19; lora: 16 of those (no --preload, --precision, --stack-folds), 19 [lora]


def test_the_lora_backbone_defaults_come_from_the_extract_section(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[extract]\nbackbone = "vit_base_patch16_dinov3"\nsize = [224, 224]\n[lora]\nrank = 4\n')
    s = load_settings(path, {"rank": 2})
    assert (s.backbone, s.size, s.rank) == ("vit_base_patch16_dinov3", (224, 224), 2)
    assert load_settings(None, {}) == LoraSettings()
    assert Path(read_config(path).path) == path and read_config(read_config(path)).doc["lora"] == {"rank": 4}


def test_a_file_of_tables_without_an_extract_table(tmp_path):
    """[reduce] (and [train]) alone: the reduction's settings, nothing read as flat extraction keys."""
    path = tmp_path / "c.toml"
    path.write_text("[reduce]\ndim = 8\npool = 2\n[train]\nepochs = 3\n")
    assert load_config_file(path) == {"reduce": True, "dim": 8, "pool": 2}
