"""`isoconv export RUN --format folder`: a finished run as a self-contained model folder in the Hugging Face Hub
layout (config.json, model.safetensors, README.md model card; see isoconv.weights.model_folder). Nothing is
uploaded: the folder is ready for the user's own tools (`huggingface-cli upload`, git). The folder is written to a
temporary folder next to the output and renamed into place, so it is whole or absent.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import RUNTIME_FIELDS, TrainConfig, build_config, list_recipes, setting_tokens, SETTINGS
from ..data.provenance import DISPLAY_NAME, data_statement, test_set_description
from ..errors import UserError
from ..fileio import atomic_write, atomic_write_folder, folders_to_create, remove_empty_folders
from ..rundir import RunDir
from ..weights.files import model_format, read_model_folder
from ..weights.meta import META_KEY, ModelMeta
from ..weights.model_folder import CARD_NAME, CONFIG_NAME, MODEL_TYPE, SUMMARY_KEY, WEIGHTS_NAME, is_model_folder
from .export import max_abs_diff, safetensors_bytes
from .load import build_with_weights, preprocess_for, read_model

DEFAULT_FOLDER_NAME = "hf-model"
HUB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100"}  # Hub dataset ids (the Hub redirects to uoft-cs/)


@dataclass(frozen=True)
class FolderExportResult:
    path: Path
    max_abs_diff: float  # the folder's model reloaded vs the run's model on a random batch (0.0: same weights)


def export_folder(run: Union[str, Path], out: Optional[Union[str, Path]] = None) -> FolderExportResult:
    """Write the finished run `run` as a model folder at `out` (default RUN/hf-model)."""
    run = Path(run)
    kind = model_format(run)
    if kind != "run":
        raise UserError(f"--format folder exports a run directory (the model card needs its summary.json), got "
                        f"{kind} {run}; pass the run's folder")
    out = Path(out) if out is not None else run / DEFAULT_FOLDER_NAME
    check_folder_output(out)
    summary = RunDir(run).read_summary()
    if not isinstance(summary, dict):
        raise UserError(f"run {run} is not finished (no {RunDir(run).summary.name}); finish it with `isoconv train "
                        f"--resume {run}`, then export it")
    model, meta = read_model(run, torch.device("cpu"))
    model = model.to(torch.float32).eval()

    def write(tmp: Path) -> None:
        (tmp / WEIGHTS_NAME).write_bytes(safetensors_bytes(model, meta))
        atomic_write(tmp / CONFIG_NAME, json.dumps(folder_config(model, meta, summary), indent=2) + "\n")
        atomic_write(tmp / CARD_NAME, model_card(meta, summary))
        state, reread = read_model_folder(tmp)  # what a user loads: check it before the folder appears
        diff[0] = max_abs_diff(model, build_with_weights(reread, state, str(tmp)).eval(), meta, 3)

    diff = [float("nan")]
    created = folders_to_create(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_folder(out, write)
    except BaseException as e:
        remove_empty_folders(created)  # a failed export leaves no folder it made on the way
        if isinstance(e, OSError):
            raise UserError(f"cannot write --output {out}: {e.strerror or e}; check the free space and "
                            f"permissions") from None
        raise
    return FolderExportResult(out, diff[0])


def check_folder_output(out: Path) -> None:
    """--output must be a new folder, an empty one, or an isoconv model folder (which is replaced)."""
    if out.is_file():
        raise UserError(f"--output {out} is a file; --format folder writes a folder: pass a new folder path")
    if out.is_dir() and any(out.iterdir()) and not (is_model_folder(out) and is_isoconv_config(out / CONFIG_NAME)):
        raise UserError(f"--output {out} is a folder that holds other files; pass a new or empty folder (an "
                        f"isoconv model folder there is replaced)")


def is_isoconv_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------- config.json

def preprocessing(meta: ModelMeta) -> dict[str, Any]:
    """How an image becomes the model's input: the checkpoint's one description of the training preprocessing."""
    pre = meta.preprocessing
    return {"input_size": pre.input_size,  # the model's input side (after any padding)
            "resize_to": pre.image_size,  # images are resized (bicubic) to this side first, when not already that size
            "interpolation": "bicubic",
            "pad_to": pre.pad_to,  # zero-padded, centred, to this side (None: no padding)
            "color": "RGB", "rescale_factor": 1 / 255, "mean": list(pre.mean), "std": list(pre.std),
            "layout": "NCHW float32"}


def folder_config(model: nn.Module, meta: ModelMeta, summary: dict[str, Any]) -> dict[str, Any]:
    classes = meta.classes
    return {"model_type": MODEL_TYPE, "architectures": [type(model).__name__], "model_name": meta.config.get("model"),
            "num_labels": len(classes), "id2label": {str(i): c for i, c in enumerate(classes)},
            "label2id": {c: i for i, c in enumerate(classes)}, "num_channels": 3, "image_size": meta.image_size,
            "torch_dtype": "float32", "preprocessing": preprocessing(meta),
            META_KEY: json.loads(meta.to_json()),
            SUMMARY_KEY: {k: v for k, v in summary.items() if k != "run_dir"}}  # run_dir: a path on the machine


# ----------------------------------------------------------------------------- README.md (the model card)

def training_command(config: dict[str, Any]) -> str:
    """The `isoconv train` command that makes this run's settings: its recipe, then every setting that changes
    what is computed and differs from the recipe (runtime settings such as --out and --device are left out)."""
    recipe = config.get("recipe")
    recipe = recipe if recipe in list_recipes() else None
    base = build_config(recipe).to_dict()
    tokens = ["isoconv", "train"] + (["--recipe", recipe] if recipe else [])
    for name in SETTINGS:
        if name in RUNTIME_FIELDS or name not in config or config[name] == base.get(name):
            continue
        tokens += setting_tokens(name, config[name])
    return " ".join(tokens)


def recipe_lines(config: dict[str, Any]) -> list[str]:
    defaults = TrainConfig().to_dict()
    always = ("model", "epochs", "batch_size", "lr_max", "schedule", "weight_decay")
    rows = [(n, config[n]) for n in SETTINGS if n in config and n not in RUNTIME_FIELDS
            and (n in always or config[n] != defaults.get(n))]
    name = config.get("recipe")
    lines = [f"Recipe: `{name}`" + (f" — {' '.join(str(config.get('description')).split())}"
                                    if config.get("description") else "") if name else "Recipe: none (flags only)", "",
             "| setting | value |", "|---|---|"]
    return lines + [f"| {n} | `{json.dumps(v) if isinstance(v, (dict, list)) else v}` |" for n, v in rows]


def pct(x: Any) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "—"


def model_card(meta: ModelMeta, summary: dict[str, Any]) -> str:
    cfg, data = meta.config, meta.data
    dataset = str(data.get("dataset") or cfg.get("dataset"))
    name = DISPLAY_NAME.get(dataset, dataset)
    verdict = summary.get("data_provenance") or data.get("provenance")
    known = (verdict or {}).get("known_copy")
    tested = test_set_description(summary.get("test_split"), summary.get("test_subset"),
                                  summary.get("test_images_total"))
    data_name = f"{name} ({'JPEG-degraded copy' if known and 'JPEG' in known else 'as verified below'})" \
        if verdict and verdict.get("official") is False else name
    front = ["---", "library_name: isoconv", "pipeline_tag: image-classification",
             f"tags: [image-classification, isoconv, {cfg.get('model')}]"]
    if dataset in HUB_DATASETS:
        front.append(f"datasets: [{HUB_DATASETS[dataset]}]")
    front += ["metrics: [accuracy]", "model-index:", f"- name: {cfg.get('model')}-{dataset}", "  results:",
              "  - task: {type: image-classification, name: Image Classification}",
              f"    dataset: {{name: {json.dumps(data_name)}, type: {json.dumps(HUB_DATASETS.get(dataset, dataset))}, "
              f"split: test}}",
              "    metrics:",
              f"    - {{type: accuracy, name: test top-1, value: {summary.get('test_top1')}}}",
              f"    - {{type: top_5_accuracy, name: test top-5, value: {summary.get('test_top5')}}}", "---", ""]
    classes = meta.classes
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    pad = cfg.get("pad_to")
    if pad:
        size = f"{cfg['image_size']}x{cfg['image_size']}" if cfg.get("image_size") else "the dataset's own size"
        steps = [f"decode as RGB at {size} (bicubic resize), the size training's images had before padding",
                 f"zero-pad, centred, to {pad}x{pad}"]
    else:
        steps = [f"decode as RGB and resize to {meta.image_size}x{meta.image_size} (bicubic), the size of "
                 f"training's images"]
    steps.append(f"scale to [0, 1], subtract mean {fmt_list(data['mean'])} and divide by std {fmt_list(data['std'])} "
                 f"(per channel R, G, B)")
    lines = front + [
        f"# {cfg.get('model')} trained on {name}", "",
        f"An isoconv `{cfg.get('model')}` image classifier ({meta.params or summary.get('params') or 0:,} parameters) "
        f"trained for {summary.get('epochs')} epoch{'' if summary.get('epochs') == 1 else 's'} on {name}: test "
        f"top-1 {pct(summary.get('test_top1'))} on "
        f"{tested}{' of the JPEG-degraded copy' if known and 'JPEG' in known else ''}.", "",
        "## Files", "",
        f"- `{CONFIG_NAME}`: the architecture (`{META_KEY}.config`: every setting of the run), the preprocessing, the "
        f"class names (`id2label`) and the run's measured results (`{SUMMARY_KEY}`)",
        f"- `{WEIGHTS_NAME}`: the weights (float32; the same isoconv metadata is in the file's header)",
        f"- `{CARD_NAME}`: this card", "",
        "## Use", "", "```python", "import isoconv", "", "model, preprocess = isoconv.load(\"MODEL_DIR\")",
        "logits = model(preprocess([\"cat.png\"]))", "print(preprocess.classes[logits.argmax(1).item()])", "```", "",
        "or `isoconv predict MODEL_DIR cat.png`, `isoconv eval MODEL_DIR` (the test set again), "
        "`isoconv serve MODEL_DIR` (a local web page).", "",
        "## Preprocessing", "", *[f"{i}. {s}" for i, s in enumerate(steps, 1)], "",
        f"Input: float32 NCHW, {meta.image_size}x{meta.image_size}. Output: {len(classes)} logits for: {shown}.", "",
        "## Training", "", *recipe_lines(cfg), "", "Command (data location and device flags left out):", "",
        "```bash", training_command(cfg), "```", "",
        "## Data", "", f"{capitalized(data_statement(verdict))}."]
    if known:
        lines += ["", f"Identified by its checksums as {known}."]
    lines += ["", "## Results", "",
              "| test top-1 | test top-5 | macro F1 | test loss | test images | epochs | train time | device "
              "(precision) | torch |", "|---:|---:|---:|---:|---:|---:|---:|---|---|",
              f"| {pct(summary.get('test_top1'))} | {pct(summary.get('test_top5'))} | "
              f"{fmt_num(summary.get('macro_f1'))} | {fmt_num(summary.get('test_loss'))} | "
              f"{summary.get('test_images', '—')} | {summary.get('epochs')} | "
              f"{minutes(summary.get('train_seconds'))} | "
              f"{summary.get('device')} ({summary.get('amp')}) | {summary.get('torch')} |", "",
              f"Measured by isoconv at the end of training on {tested}.", "",
              "## Intended use and limits", "",
              f"- For research and teaching on small images of the classes above ({name}-like photos, "
              f"{meta.image_size}x{meta.image_size} after preprocessing). Not for decisions about people, safety or "
              f"anything where an error does harm.",
              "- It always answers with one of its classes: an image of anything else still gets a confident-looking "
              "probability. There is no calibration beyond training's own.",
              f"- Accuracy is only known on the test set described above; other images (other cameras, sizes, "
              f"sources) may score much lower. It inherits the biases and label noise of {name}.",
              "- Larger images are shrunk to the input size, which loses detail the model never saw anyway.",
              "", "## License", "",
              "Not set by isoconv: choose a license for these weights before sharing them, and respect the "
              "dataset's terms.", ""]
    return "\n".join(lines)


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def fmt_list(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def fmt_num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "—"


def minutes(seconds: Any) -> str:
    return f"{seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else "—"
