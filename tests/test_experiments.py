"""Ablation specs, sweeps (resumable), results statistics, plots, reports and TensorBoard logging."""
import csv
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import captured_logs
import yaml

from isoconv.cli import main
from isoconv.errors import ConfigError, UserError
from isoconv.experiments import list_specs, load_spec, run_ablation
from isoconv.experiments.ablate import format_command
from isoconv.experiments.cli import parse_set
from isoconv.train.tensorboard import open_tensorboard

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = {"model": "cm-cpu", "dim": 16, "depth": 1, "kernel": 3, "epochs": 2, "batch_size": 32, "train_subset": 64,
        "test_subset": 48, "amp": "off", "schedule": "onecycle-frac", "ra_n": 0, "jitter": 0.0, "reprob": 0.0}


def write_spec(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def quiet(*_):
    pass


# ----------------------------------------------------------------------------- specs

def test_grid_expands_to_every_combination_first_key_outermost(tmp_path):
    spec = load_spec(write_spec(tmp_path / "wd.yaml", {
        "base": "cpu-quick", "settings": {"epochs": 3}, "grid": {"dim": [128, 256], "depth": [4, 8, 12]}}))
    assert [v.name for v in spec.variants] == ["dim=128,depth=4", "dim=128,depth=8", "dim=128,depth=12",
                                              "dim=256,depth=4", "dim=256,depth=8", "dim=256,depth=12"]
    assert spec.variants[4].settings == {"epochs": 3, "dim": 256, "depth": 8}
    assert spec.variants[4].recipe == "cpu-quick"
    assert spec.baseline == "dim=128,depth=4" and spec.seeds == 1 and spec.grid_keys == ("dim", "depth")
    assert not spec.variants[0].shows_published  # a base recipe's published figure is not the grid point's


def test_list_variants_take_their_recipe_then_own_settings(tmp_path):
    spec = load_spec(write_spec(tmp_path / "l.yaml", {
        "settings": {"epochs": 5, "clip_norm": 2.0}, "seeds": 3, "baseline": "b",
        "variants": [{"name": "a", "recipe": "cm-xl"}, {"name": "b", "recipe": "cm-xl", "clip_norm": None}]}))
    from isoconv.experiments.spec import variant_config
    a, b = (variant_config(v) for v in spec.variants)
    assert (a.model, a.epochs, a.batch_size, a.clip_norm, a.seed) == ("cm-xl", 5, 128, 2.0, 1204)
    assert b.clip_norm is None  # an explicit null in the spec is kept
    assert spec.seeds == 3 and spec.baseline == "b" and spec.variants[0].shows_published


@pytest.mark.parametrize("data, message", [
    ({"varients": [{"name": "a"}]}, r"unknown key 'varients' .*did you mean variants"),
    ({"variants": [{"name": "a", "dpeth": 4}]}, r"unknown setting 'dpeth' in variant 'a' .*did you mean depth"),
    ({"settings": {"lr": 0.1}, "variants": [{"name": "a"}]}, r"unknown setting 'lr' in `settings`"),
    ({"grid": {"depth": [4]}, "variants": [{"name": "a"}]}, r"exactly one of `grid:`"),
    ({"grid": {"depth": []}}, r"`grid.depth` .* non-empty list"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, r"need distinct names"),
    ({"variants": [{"name": "a", "epochs": 0}]}, r"variant 'a' .*--epochs must be positive, got 0"),
    ({"variants": [{"name": "a"}], "baseline": "z"}, r"`baseline: z` .* names no variant"),
    ({"variants": [{"name": "a"}], "seeds": 0}, r"`seeds` .* positive integer"),
    ({"settings": {"out": "x"}, "variants": [{"name": "a"}]}, r"`out` in `settings` .* pass `isoconv ablate --out"),
])
def test_bad_specs_fail_with_a_message_naming_the_problem(tmp_path, data, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec(tmp_path / "bad.yaml", data))


def test_invalid_yaml_and_unknown_names_are_one_line_errors(tmp_path):
    path = write_spec(tmp_path / "broken.yaml", "variants:\n  - {name: a\n  - b: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml line \d+ is not valid YAML"):
        load_spec(path)
    with pytest.raises(ConfigError, match=r"unknown ablation spec 'convmixer-xl-tabel' \(did you mean "
                                          r"convmixer-xl-table"):
        load_spec("convmixer-xl-tabel")
    with pytest.raises(ConfigError, match=r"missing.yaml does not exist"):
        load_spec(str(tmp_path / "missing.yaml"))


def test_shipped_specs_parse_and_expand():
    assert set(list_specs()) >= {"convmixer-xl-table", "convmixer-xl-table-cpu-mini", "convmixer-width-depth",
                                 "convnext-activation-depth"}
    for name in list_specs():
        assert load_spec(name).variants
    from isoconv.experiments.spec import variant_config
    xl = load_spec("convmixer-xl-table")
    names = ["CM-Vanilla-NoAug", "CM-Vanilla", "CM-Vanilla-ReLU", "CM-Vanilla-SiLU", "CM-XL-NoSkip", "CM-XL-Skip",
             "CM-XL"]
    assert [v.name for v in xl.variants] == names
    published = [variant_config(v).published["test_top1"] for v in xl.variants]
    assert published == [0.8854, 0.9378, 0.9384, 0.9372, 0.4868, 0.9422, 0.9452]
    assert all(v.shows_published for v in xl.variants)
    mini = load_spec("convmixer-xl-table-cpu-mini")
    assert [v.name for v in mini.variants] == names
    cfgs = [variant_config(v) for v in mini.variants]
    assert [c.depth for c in cfgs] == [None] * 4 + [24] * 3 and {c.dim for c in cfgs} == {64}
    assert [c.no_aug for c in cfgs] == [True] + [False] * 6 and {c.amp for c in cfgs} == {"off"}
    wd = load_spec("convmixer-width-depth")
    assert [(variant_config(v).dim, variant_config(v).depth) for v in wd.variants] == \
        [(128, 4), (128, 8), (128, 12), (256, 4), (256, 8), (256, 12)]
    cn = load_spec("convnext-activation-depth")
    assert len(cn.variants) == 9 and {variant_config(v).model for v in cn.variants} == {"convnext-cifar"}


@pytest.mark.parametrize("raw, value, marker, percent, fraction", [
    (0.9452, 0.9452, "", "94.52", "0.9452"), ("~0.885", 0.885, "~", "~88.5", "~0.885"),
    (">0.94", 0.94, ">", ">94", ">0.94"), ("~92.5%", 0.925, "~", "~92.5", "~0.925"), (0.64, 0.64, "", "64", "0.64"),
    ("≈ 0.5", 0.5, "≈", "≈50", "≈0.5"),
])
def test_published_figures_keep_their_marker_and_digits(raw, value, marker, percent, fraction):
    from isoconv.experiments.published import parse_figure

    fig = parse_figure(raw)
    assert (fig.value, fig.marker, fig.percent(), fig.fraction()) == (value, marker, percent, fraction)


def test_bad_published_figures_and_every_shipped_recipe_figure():
    from isoconv.config import list_recipes, load_recipe
    from isoconv.experiments.published import figures_text, parse_figure, published_figures

    for bad in ("about 0.9", "0.9x", "1.5", "?", True, [0.9]):
        with pytest.raises(ConfigError, match=r"published\.test_top1 must be a fraction"):
            published_figures({"test_top1": bad})
    with pytest.raises(ConfigError, match="must be a fraction"):
        parse_figure("")
    texts = {name: figures_text(load_recipe(name).get("published")) for name in list_recipes()}
    assert texts["tf-rep-fixed-adam"] == "top-1 ~88.5%; paper top-1 91.26%"
    assert texts["convmixer-cifar10-25ep"] == "top-1 ~92.5%" and texts["convmixer-cifar10-100ep"] == "top-1 >94%"
    assert texts["convnext-tin"] == "top-1 64%" and texts["convmixer-keras-cifar100"] == "top-5 64.41%"
    assert texts["cm-xl"] == "top-1 94.52%"


def test_command_reconstruction_round_trips_through_set():
    cmd = format_command("my spec.yaml", seeds=3, parallel=2, out=Path("out"),
                         overrides={"data_dir": "../d", "tensorboard": True, "epochs": 2, "activation": "silu",
                                    "clip_norm": None, "published": {"test_top1": 0.5}})
    assert cmd.startswith("isoconv ablate 'my spec.yaml' --seeds 3 --parallel 2 --out out --data-dir ../d "
                          "--tensorboard ")
    import shlex
    words = shlex.split(cmd)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert parse_set(sets) == {"epochs": 2, "activation": "silu", "clip_norm": None, "published": {"test_top1": 0.5}}
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch' .*did you mean epochs"):
        parse_set(["epoch=3"])


# ----------------------------------------------------------------------------- a real sweep

@pytest.fixture(scope="module")
def sweep(data_root, tmp_path_factory):
    """2 variants x 2 seeds of a tiny ConvMixer; every run is first stopped after epoch 1, then resumed."""
    root = tmp_path_factory.mktemp("sweep")
    spec = write_spec(root / "tiny.yaml", {
        "description": "tiny test sweep", "seeds": 2, "settings": TINY,
        "variants": [{"name": "relu", "activation": "relu"},
                     {"name": "gelu", "activation": "gelu",
                      "published": {"test_top1": "~0.5", "paper_top1": 0.605, "params": "3k", "source": "a test"}}]})
    out = root / "out"
    overrides = {"data_dir": str(data_root), "tensorboard": True}
    with captured_logs() as logs:
        run_ablation(str(spec), out=out, overrides=overrides, stop_after=1, plots=False)
        interrupted = {p.parent.relative_to(out).as_posix(): p.read_text()
                       for p in out.glob("*/seed*/metrics.jsonl")}
        run_ablation(str(spec), out=out, overrides=overrides, plots=False)  # report test plots
    return {"spec": spec, "out": out, "logs": logs, "interrupted": interrupted, "overrides": overrides}


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def summaries(out: Path, variant: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / variant).glob("seed*/summary.json"))]


def test_results_rows_hold_mean_and_std_over_seeds(sweep):
    out = sweep["out"]
    rows = read_csv(out / "results.csv")
    assert [r["variant"] for r in rows] == ["relu", "gelu"]
    assert [r["activation"] for r in rows] == ["relu", "gelu"]  # the only varied setting is a column
    for row in rows:
        s = summaries(out, row["variant"])
        top1 = [x["test_top1"] for x in s]
        assert len(top1) == 2 and row["seeds_done"] == "2" and row["seeds"] == "0;1"
        assert float(row["test_top1_mean"]) == pytest.approx(statistics.mean(top1))
        assert float(row["test_top1_std"]) == pytest.approx(statistics.stdev(top1))
        assert float(row["test_top5_mean"]) == pytest.approx(statistics.mean(x["test_top5"] for x in s))
        assert float(row["train_seconds"]) == pytest.approx(statistics.mean(x["train_seconds"] for x in s))
        assert int(row["params"]) == s[0]["params"] == 16 * 3 * 16 + 16 * 3 + 16 * 9 + 16 * 3 + 16 * 16 + 16 * 3 + 170
        assert int(row["flops"]) > 0
    assert float(rows[0]["relative_train_time"]) == 1.0
    assert float(rows[1]["relative_train_time"]) == pytest.approx(
        float(rows[1]["train_seconds"]) / float(rows[0]["train_seconds"]))
    assert rows[0]["published_top1"] == "" and rows[1]["published_top1"] == "~0.5"  # as published, marker kept
    assert float(rows[1]["published_top1_value"]) == 0.5 and float(rows[1]["paper_top1_value"]) == 0.605
    assert rows[1]["paper_top1"] == "0.605" and rows[1]["published_top5"] == "" and rows[1]["published_params"] == "3k"
    md = (out / "results.md").read_text()
    assert f"isoconv ablate {sweep['spec']} --seeds 2 --out {out} --data-dir" in md
    assert "torch" in md and "- **test split**: the first 48 images of the full test split" in md
    # the shared copy is JPEG-degraded: once training records the verdict, the report says so
    data_line = next(line for line in md.splitlines() if line.startswith("- **data**: "))
    assert data_line.endswith(("data provenance not recorded (run made by an older isoconv)",
                               "differs from the official release (every file's checksum differs): accuracies may "
                               "not compare with published figures"))
    assert rows[1]["published_comparable"].startswith("no: ") and rows[0]["published_comparable"] == ""
    mean, std = float(rows[1]["test_top1_mean"]), float(rows[1]["test_top1_std"])
    assert f"| gelu | gelu | {int(rows[1]['params']):,} (the seed says 3k) |" in md
    assert "| published top-1 % | paper top-1 % (quoted) | comparable? |" in md and "| ~50 | 60.5 | no: " in md
    assert f"| relu | relu | {int(rows[0]['params']):,} |" in md and "| — | — | — |" in md
    assert "own figures (`~`: as the source gives it" in md
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in md


def test_seeds_differ_per_repetition(sweep):
    out = sweep["out"]
    seeds = [yaml.safe_load((out / "relu" / d / "config.yaml").read_text())["seed"] for d in ("seed0", "seed1")]
    assert seeds == [0, 1]
    losses = [json.loads((out / "relu" / d / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
              for d in ("seed0", "seed1")]
    assert losses[0] != losses[1]


def test_interrupted_runs_are_resumed_not_restarted(sweep):
    out = sweep["out"]
    assert len(sweep["interrupted"]) == 4
    for name, first_attempt in sweep["interrupted"].items():
        rows = (out / name / "metrics.jsonl").read_text().splitlines()
        assert len(first_attempt.splitlines()) == 1 and len(rows) == 2
        assert rows[0] == first_attempt.splitlines()[0]  # epoch 1 kept as it was (same seconds): not retrained
    assert any("4 to resume" in line for line in sweep["logs"])
    assert "resuming after epoch 1" in (out / "gelu" / "seed1" / "ablate.log").read_text()


def test_finished_runs_are_skipped_and_changed_settings_refused(sweep):
    out, spec = sweep["out"], sweep["spec"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")}
    with captured_logs() as logs:
        run_ablation(str(spec), out=out, overrides=sweep["overrides"], plots=False)
    assert any("4 finished (skipped), 0 to resume, 0 to start" in line for line in logs)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/summary.json")} == stamps
    with pytest.raises(UserError, match=r"holds a run with other settings \(epochs: 2 -> 3"):
        run_ablation(str(spec), out=out, overrides={**sweep["overrides"], "epochs": 3})


def svg_ok(path: Path) -> bool:
    return ET.parse(path).getroot().tag.endswith("svg")


def test_report_regenerates_plots_and_links_them(sweep, capsys):
    out = sweep["out"]
    for p in (out / "plots").glob("*"):
        p.unlink()
    assert main(["report", str(out)]) == 0
    expected = ["accuracy_vs_params", "accuracy_vs_relative_time", "ours_vs_published", "lr_schedule", "curves",
                "relu-confusion", "relu-per_class_f1", "gelu-confusion", "gelu-per_class_f1"]
    for stem in expected:
        assert (out / "plots" / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
        assert svg_ok(out / "plots" / f"{stem}.svg")
    report = (out / "report.md").read_text()
    links = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert sorted(links) == sorted(f"plots/{s}.png" for s in expected)
    assert f"regenerated from the run folders by `isoconv report {out}`" in report
    assert "| relu | relu |" in report and "## Ours vs published" in report
    svg = (out / "plots" / "ours_vs_published.svg").read_text()
    assert "~50" in svg and "60.5" in svg and "ours top-1" in svg  # the figure as published, beside ours

    run = out / "relu" / "seed0"
    assert main(["report", str(run)]) == 0
    for stem in ("run-curves", "run-lr_schedule", "run-confusion", "run-per_class_f1"):
        assert (run / "plots" / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC and svg_ok(run / "plots" / f"{stem}.svg")
    run_report = (run / "report.md").read_text()
    assert "![confusion matrix](plots/run-confusion.png)" in run_report and "isoconv ablate" in run_report
    assert main(["report", str(out / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tensorboard_event_file_holds_every_scalar(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sweep["out"] / "gelu" / "seed0"
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags >= {"lr", "train/loss", "train/acc", "test/loss", "test/top1", "test/top5", "time/epoch_seconds",
                    "time/images_per_second"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    top1 = acc.Scalars("test/top1")
    assert [e.step for e in top1] == [1, 2]  # the resumed run logged each epoch once
    assert [e.value for e in top1] == pytest.approx([r["test_top1"] for r in rows])


def test_missing_tensorboard_is_a_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"--tensorboard needs the tensorboard package; `pip install tensorboard`"):
        open_tensorboard(tmp_path)
    open_tensorboard(tmp_path, enabled=False).log_epoch({"epoch": 1, "lr": 0.1})  # disabled: no import at all


def test_ablate_cli_dry_run_and_errors(tmp_path, capsys):
    assert main(["ablate", "convmixer-xl-table", "--dry-run", "--seeds", "2", "--out", str(tmp_path / "xl")]) == 0
    out = capsys.readouterr().out
    assert "7 variants x 2 seed(s) = 14 runs" in out and f"{tmp_path / 'xl'}/CM-XL/seed1205" in out
    assert not (tmp_path / "xl").exists()  # a dry run writes nothing
    assert main(["ablate", "convmixer-xl-table", "--variants", "CM-XL,CM-Vanilla", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "(only CM-Vanilla, CM-XL)" in out and "CM-XL-Skip/seed1204 (not now)" in out
    assert "CM-XL/seed1204 (not now)" not in out
    assert main(["ablate", "convmixer-xl-table", "--variants", "CM-XXL", "--dry-run"]) == 2
    assert "has no variant 'CM-XXL' (did you mean CM-XL" in capsys.readouterr().err
    assert main(["ablate", "convmixer-xl-tabel"]) == 2
    assert "did you mean convmixer-xl-table" in capsys.readouterr().err
    assert main(["ablate", "convmixer-xl-table", "--set", "depth", "--dry-run"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert main(["ablate", "convmixer-xl-table", "--set", "depth=65", "--dry-run"]) == 2
    assert "variant 'CM-XL-Skip'" in capsys.readouterr().err
