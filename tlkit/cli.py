"""Command line: YAML -> config -> flag overrides -> one library call -> exit code. argparse only.

Every field of a verb's config dataclass (`FinetuneConfig`, `tlkit.core.verb_configs`) is a flag (`--field-name`),
made by the one builder `add_fields`, its help taken from the dataclass docstring and its default from the
dataclass, so flags, YAML keys and the Python API cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import traceback
import types
import typing
from typing import Any

from tlkit.core import config as C
from tlkit.core import config_io
from tlkit.core import verb_configs as V
from tlkit.core.errors import ConfigError, TlkitError

DESCRIPTION = ("Transfer learning for Keras 3: fine-tune pretrained "
               "backbones on TFDS datasets or image folders, evaluate, inspect.")
# Each verb: (its line in `tlkit --help`, the description of `tlkit VERB --help`).
VERBS = {
    "finetune": ("Fine-tune a pretrained backbone and write a run folder.",
        "Fine-tune a pretrained backbone. Outputs in --output-dir: config.yaml, labels.txt, "
        "model.keras, history.csv, metrics.json. Example: tlkit finetune --base resnet50 --dataset "
        "oxford_flowers102"),
    "evaluate": ("Evaluate a run folder or .keras model on a dataset split.",
        "Evaluate a model: prints a table and writes metrics.json (loss, top-1, top-5, "
        "mean per-class accuracy, per-class precision/recall/F1)."),
    "lr-find": ("Find a learning rate with an LR range test (fastai's lr_find).",
        "Train the stage you are about to train for up to --num-steps batches while the "
        "learning rate grows exponentially from --start-lr to --end-lr, stop when the loss diverges, "
        "restore the weights; write lr_find.png and lr_find.json into --output-dir and print the "
        "suggested --lr (valley; steepest descent too). Takes finetune's flags. Example: tlkit lr-find "
        "--base resnet50 --dataset oxford_flowers102"),
    "export": ("Export a run folder or .keras model (keras, savedmodel, tflite, onnx), checked.",
        "Export a model with its resize and labels, then check it: sample images go "
        "through the export and the Keras model; top-1 agreement and max |dp| are printed and written to "
        "export.json (exit 1 below the threshold). Writes model_card.md beside the export. Example: "
        "tlkit export runs/x --format tflite --quantize int8"),
    "predict": ("Predict the classes of images with any model or export.",
        "Predict the top classes of image files and folders with a run folder, .keras, "
        "SavedModel folder, .tflite or .onnx; unreadable files are reported and skipped. Example: "
        "tlkit predict runs/x photos/ --top-k 3"),
    "tune": ("Search learning rate, batch size and more with KerasTuner; writes best_config.yaml.",
        "Hyperparameter search with KerasTuner on the same model and data code as finetune: "
        "every finetune flag, plus the search options below. The learning rate (log scale) and the batch "
        "size (the data is re-batched per trial) are always searched; --search adds dropout, "
        "label_smoothing, unfreeze_stages, optimizer, augment. For --strategy two_stage, --two-stage-lr "
        "picks what is searched: by default the fine-tuning stage's learning rate, the head warm-up fixed "
        "at --lr for --head-steps. Outputs in --output-dir (default runs/tune-BASE-DATASET): tune.yaml, "
        "trials.csv, best_config.yaml (for tlkit finetune --config), objective_vs_lr.png, search/ "
        "(KerasTuner's project). Re-running the same command resumes the search; --overwrite starts "
        "over. A failed trial (NaN, out of memory, error) is recorded and the search goes on. "
        "Distributed: set KERASTUNER_TUNER_ID (chief | tuner0, tuner1, ...), KERASTUNER_ORACLE_IP and "
        "KERASTUNER_ORACLE_PORT and run the same command in every process. Example: tlkit tune --base "
        "resnet50 --dataset oxford_flowers102 --tuner bayesian --max-trials 20 --trial-epochs 3"),
    "distill": ("Distil a fine-tuned teacher into a small student; writes the student's run folder.",
        "Knowledge distillation: trains the student backbone (--student) plus head with "
        "alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)); the "
        "teacher runs in inference mode (its logits are computed once when --augment none). The data "
        "defaults to the teacher run's; every finetune flag applies to the student. Outputs a normal run "
        "folder (model.keras, labels.txt, config.yaml, history.csv with ce/kl, metrics.json with the "
        "teacher/student table: accuracy, parameters, size, CPU latency). Example: tlkit distill "
        "--teacher runs/resnet50-flowers --student mobilenetv2 --temperature 4 --alpha 0.5"),
    "prune": ("Magnitude-prune a run's model with a sparsity schedule and fine-tune to recover.",
        "Magnitude pruning for Keras 3: zeroes the smallest weights of every Conv/Dense "
        "kernel (not the classification layer unless --prune-head), raising the sparsity on a schedule "
        "while fine-tuning on the run's data, so each pruned kernel ends exactly --sparsity sparse. "
        "Prints and writes (metrics.json) accuracy against sparsity and the zipped model size. Outputs a "
        "run folder (default RUN_DIR-prunedNN). Example: tlkit prune runs/resnet50-flowers --sparsity 0.5 "
        "--schedule polynomial --epochs 2"),
    "info": ("Versions, devices, registered backbones and datasets.",
        "Print versions, devices, registered backbones and datasets."),
}


CHOICES = {
    "augment": C.AUGMENT_PRESETS, "cache": C.CACHE_CHOICES, "strategy": C.STRATEGIES, "optimizer": C.OPTIMIZERS,
    "schedule": C.SCHEDULES, "precision": C.PRECISIONS, "xla": C.XLA_CHOICES, "distribute": C.DISTRIBUTE_CHOICES,
}
METAVARS = {"dataset": "NAME", "image_dir": "DIR", "labels": "FILE.csv", "data_dir": "DIR", "base": "NAME|PATH.keras",
            "weights": "imagenet|none|PATH", "output_dir": "DIR", "early_stopping": "PATIENCE",
            "lr": "LR|auto", "class_weight": "none|balanced|W1,W2,...", "label_delimiter": "CHAR"}
TUNE_CHOICES = {"tuner": V.TUNERS, "objective": V.TUNE_OBJECTIVES, "two_stage_lr": V.TWO_STAGE_LR_CHOICES}
TUNE_METAVARS = {"lr_range": ("LO", "HI"), "batch_sizes": "N", "search": "DIM[,DIM...]", "max_trials": "N",
                 "executions_per_trial": "N", "trial_epochs": "N", "grid_points": "N", "max_consecutive_failures": "N"}
DATA_METAVARS = {"model": "MODEL", "dataset": "NAME", "image_dir": "DIR", "data_dir": "DIR", "output_dir": "DIR"}


def _attribute_docs(cls: type) -> dict[str, str]:
    """Parses the `Attributes:` section of a dataclass docstring into {name: text}."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    part = doc.split("Attributes:", 1)[-1]
    current = None
    for line in part.splitlines():
        m = re.match(r"^\s{8}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return {k: v.replace("%", "%%").replace("`", "") for k, v in out.items()}


def _field_type(cls: type, name: str) -> type:
    """The type a flag parses: `X` of `X | None`, the item type of a tuple, `str` for `float | str` ("auto")."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else [hint]
    if len(args) > 1:  # e.g. lr: float | str ("auto"): pass the text on, the config coerces and validates it
        return str
    return typing.get_args(args[0])[0] if typing.get_origin(args[0]) in (tuple, list) else args[0]


def add_fields(parser: argparse.ArgumentParser, cls: type, title: str | None = None, *, skip: tuple[str, ...] = (),
               choices: dict[str, tuple[str, ...]] | None = None, metavars: dict[str, Any] | None = None,
               nargs: dict[str, Any] | None = None, positional: tuple[str, ...] = (),
               store_true: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> Any:
    """THE flag builder: one argument per field of a config dataclass, its help the field's `Attributes:` text,
    default None (= not given: the YAML or the dataclass default holds). Returns the group (or the parser)."""
    target = parser.add_argument_group(title) if title else parser
    docs, choices, metavars, nargs = _attribute_docs(cls), choices or {}, metavars or {}, nargs or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help_text, count = docs.get(f.name, ""), ({"nargs": nargs[f.name]} if f.name in nargs else {})
        if f.name in positional:
            target.add_argument(f.name, metavar=metavars[f.name], help=help_text, **count)
            continue
        flag, typ = "--" + f.name.replace("_", "-"), _field_type(cls, f.name)
        if typ is bool:
            target.add_argument(flag, dest=f.name, default=None, help=help_text,
                                action="store_true" if f.name in store_true else argparse.BooleanOptionalAction)
        else:
            target.add_argument(flag, dest=f.name, type=typ, default=None, choices=choices.get(f.name),
                                metavar=None if f.name in choices else metavars.get(f.name, f.name.upper()),
                                required=f.name in required, help=help_text, **count)
    return target


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given on the command line (not None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """A verb's config dataclass from the given flags, the dataclass's defaults elsewhere."""
    return cls(**{**given(cls, args), **extra})


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Adds `--config` and one flag per `FinetuneConfig` field, a group per section."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML configuration (nested sections or flat keys); "
                        "flags override it.")
    for section, cls in [*C.SECTIONS.items(), ("run", C.FinetuneConfig)]:
        add_fields(parser, cls, f"{section} options", skip=(*skip, *C.SECTIONS), choices=CHOICES, metavars=METAVARS)


def config_from_args(args: argparse.Namespace, base: C.FinetuneConfig | None = None) -> C.FinetuneConfig:
    """`base` (else the YAML of `--config`, else the defaults) <- flags."""
    if base is None:
        base = config_io.load_config(args.config) if getattr(args, "config", None) else C.FinetuneConfig()
    index = config_io.field_index()
    return config_io.config_from_dict({k: v for k, v in vars(args).items() if k in index and v is not None}, base)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump: finetune's usage alone is 60 lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _json(target: Any, text: str) -> None:
    target.add_argument("--json", action="store_true", help=text)


def _evaluate_flags(p: argparse.ArgumentParser) -> None:
    add_fields(p, V.EvaluateConfig, positional=("model",), choices={"split": V.SPLITS},
               metavars={**DATA_METAVARS, "labels": "FILE", "num_misclassified": "N", "tta": "N", "ood": "DIR",
                         "reject_below": "P", "label_delimiter": "CHAR"})
    _json(p, "Print the metrics as JSON instead of a table.")


def _lr_find_flags(p: argparse.ArgumentParser) -> None:
    add_config_flags(p, skip=("lr",))
    g = add_fields(p, V.LRFindConfig, "lr-find options", metavars={"start_lr": "LR", "end_lr": "LR", "num_steps": "N",
                                                                     "stage": "NAME"})
    _json(g, "Print the result as JSON.")


def _export_flags(p: argparse.ArgumentParser) -> None:
    add_fields(p, V.ExportConfig, positional=("model",), required=("format",), store_true=("overwrite",),
               choices={"format": V.EXPORT_FORMATS, "quantize": V.QUANTIZATIONS, "int8_input": V.INT8_INPUTS},
               metavars={**DATA_METAVARS, "output": "PATH", "calibration_steps": "N", "check_images": "PATH",
                         "num_check": "N", "min_agreement": "F", "max_diff": "F"}, nargs={"check_images": "+"})
    _json(p, "Print export.json's content instead of the summary lines.")


def _predict_flags(p: argparse.ArgumentParser) -> None:
    add_fields(p, V.PredictConfig, positional=("model", "inputs"), nargs={"inputs": "+"},
               metavars={"model": "MODEL", "inputs": "IMAGE_OR_DIR", "top_k": "K", "batch_size": "N", "tta": "N",
                         "reject_below": "P", "explain": "DIR"})
    _json(p, "Print JSON (predictions and skipped files) for scripts.")


def _tune_flags(p: argparse.ArgumentParser) -> None:
    add_config_flags(p)
    add_fields(p, V.TuneConfig, "search options (tune)", choices=TUNE_CHOICES, metavars=TUNE_METAVARS,
               nargs={"lr_range": 2, "batch_sizes": "+"})


def _distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", metavar="NAME|PATH.keras", default=None,
                   help="Student backbone: a registered name (e.g. mobilenetv2) or a .keras backbone (sets --base).")
    add_fields(p, V.DistillConfig, "distillation options", metavars={"teacher": "RUN_DIR|MODEL.keras"})
    add_config_flags(p, skip=("base",))


def _prune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="The run folder to prune (model.keras, labels.txt, config.yaml).")
    add_fields(p, V.PruneConfig, "pruning options", skip=("run_dir",), choices={"schedule": V.PRUNE_SCHEDULES},
               metavars={"output_dir": "DIR", "sweep": "S1,S2,..."})


def build_parser() -> argparse.ArgumentParser:
    """The `tlkit` parser: per verb its help and description (`cli_text.VERBS`), its flags and its command."""
    parser = _Parser(prog="tlkit", description=DESCRIPTION)
    _add_common(parser)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    flags = {"finetune": add_config_flags, "evaluate": _evaluate_flags, "lr-find": _lr_find_flags,
             "export": _export_flags, "predict": _predict_flags, "tune": _tune_flags, "distill": _distill_flags,
             "prune": _prune_flags, "info": lambda p: _json(p, "Print as JSON.")}
    for verb, (help_text, description) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=description)
        flags[verb](p)
        _add_common(p)
        p.set_defaults(func=COMMANDS[verb])
    return parser


def cmd_finetune(args: argparse.Namespace) -> int:
    from tlkit.verbs.finetune import finetune

    finetune(config_from_args(args))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tlkit.verbs.evaluate import evaluate

    ec = from_args(V.EvaluateConfig, args).validate()
    table = ec.labels if ec.labels and ec.labels.lower().endswith(".csv") else None  # data, not class names
    data, seed = V.run_data(ec.model if os.path.isdir(ec.model) else None, ec.dataset, ec.image_dir, ec.data_dir,
                            table)
    if data.dataset is None and data.image_dir is None and data.labels is None:
        raise ConfigError("evaluate needs --dataset NAME or --image-dir DIR (or a run folder that names its data).")
    if ec.label_delimiter is not None:
        if not table:
            raise ConfigError("--label-delimiter needs --labels FILE.csv (a table whose label cells hold several "
                              "labels).")
        data = dataclasses.replace(data, label_delimiter=ec.label_delimiter, multi_label=None)
        C.check_label_delimiter(data)
    labels = None
    if ec.labels and not table:
        from tlkit.models.classifier import read_labels

        if not os.path.isfile(ec.labels):
            raise ConfigError(f"--labels {ec.labels!r} is not a file.")
        labels = read_labels(ec.labels)
    m = evaluate(ec.model, data, split=ec.split, batch_size=ec.batch_size, output_dir=ec.output_dir, seed=seed,
                 class_names=labels, num_misclassified=ec.num_misclassified, tta=ec.tta, ood=ec.ood,
                 reject_below=ec.reject_below)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "confusion_matrix"}, indent=2))
    else:
        print(evaluation_report(m))
    return 0


def evaluation_report(m: dict[str, Any]) -> str:
    """The text `tlkit evaluate` prints for the metrics `m`."""
    from tlkit.engine.metrics import per_class_table, summary_table

    lines = []
    if m.get("tta"):
        lines.append(f"[tlkit] test-time augmentation: mean of {m['tta']['n'] + 1} views ({', '.join(m['tta']['views'])})")
    lines += [summary_table({m["split"]: m}), "", per_class_table(m)]
    if m.get("most_confused"):
        lines.append("\nmost confused (true -> predicted: count): " + "; ".join(
            f"{c['true']} -> {c['predicted']}: {c['count']}" for c in m["most_confused"][:5]))
    if m.get("ood"):
        from tlkit.engine.ood import ood_table

        lines.append("\n" + ood_table(m["ood"]))
        if m["ood"].get("stored"):
            lines.append(f"[tlkit] threshold stored in {m['ood']['stored']}: predict answers 'unknown' below it")
    if m.get("worst_examples"):
        lines.append("\nworst examples (missed / spurious labels): " + "; ".join(
            f"{os.path.basename(e.get('file', str(e['index'])))}: {', '.join(e['missed']) or '-'} / "
            f"{', '.join(e['spurious']) or '-'}" for e in m["worst_examples"][:5]))
    if m.get("output_dir"):
        files = ("metrics.json, pr_curves.png and worst_examples.png" if "mean_average_precision" in m else
                 "metrics.json, confusion_matrix.png, confusion_matrix.csv, misclassified.png and "
                 "misclassified_gradcam.png")
        lines.append(f"\n[tlkit] {files} written to {m['output_dir']}")
    return "\n".join(lines)


def cmd_lr_find(args: argparse.Namespace) -> int:
    from tlkit.verbs.lr_find import lr_find

    result = lr_find(config_from_args(args), **dataclasses.asdict(from_args(V.LRFindConfig, args)))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"suggested --lr {result.suggestion:.2e}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tlkit.verbs.export import ParityError, export

    try:
        r = export(**dataclasses.asdict(from_args(V.ExportConfig, args)), verbose=not args.json)
    except ParityError as e:  # written, but wrong: not a usage error
        print(f"tlkit: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        from tlkit.core.sidecars import sidecar

        with open(sidecar(r.path, "export.json"), encoding="utf-8") as f:
            print(f.read().rstrip())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tlkit.verbs.predict import predict

    pc = from_args(V.PredictConfig, args)
    r = predict(**dataclasses.asdict(pc), progress=not args.json)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        print(r.table())
    for f, why in r.skipped:
        print(f"tlkit: skipped {f}: {why}", file=sys.stderr)
    if r.explained is not None and not args.json:
        print(f"[tlkit] {len(r.explained)} Grad-CAM overlays written to {pc.explain}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tlkit.core.tune_config import load_tune_config, tune_config_from_dict
    from tlkit.verbs.tune import tune

    cfg, tc = load_tune_config(args.config) if getattr(args, "config", None) else (C.FinetuneConfig(), V.TuneConfig())
    tune(config_from_args(args, cfg), tune_config_from_dict(given(V.TuneConfig, args), tc))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from tlkit.verbs.distill import distill, teacher_run_config

    dcfg = from_args(V.DistillConfig, args).validate()
    if args.student is None:  # distill has no --base: the student is the base
        raise ConfigError("distill needs a student backbone: --student NAME (e.g. mobilenetv2) or --student PATH.keras.")
    cfg = config_from_args(args, None if getattr(args, "config", None) else teacher_run_config(dcfg.teacher))
    distill(config_io.config_from_dict({"base": args.student}, cfg), dcfg)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from tlkit.verbs.prune import prune

    prune(from_args(V.PruneConfig, args, run_dir=args.run_dir))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import keras
    import numpy as np
    import tensorflow as tf

    import tlkit
    from tlkit.models.backbones import get_backbone, list_backbones
    from tlkit.data import list_datasets

    versions = {"tlkit": tlkit.__version__, "python": sys.version.split()[0], "tensorflow": tf.__version__,
                "keras": keras.__version__, "numpy": np.__version__}
    import importlib.metadata as md

    for dist in ("keras-tuner", "tensorflow-datasets", "keras-hub", "ai-edge-litert", "tensorboard"):
        try:  # the installed distribution, without importing it (keras-hub alone takes seconds)
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:  # optional at info time; the extras: hub, litert, tensorboard
            versions[dist] = "not installed"
    devices = [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()]
    backbones = {n: {"input_size": get_backbone(n).default_size, "preprocess": get_backbone(n).preprocess}
                 for n in list_backbones()}
    from tlkit.models.backbones import list_hub_families

    hub = {"installed": versions["keras-hub"] != "not installed", "families": list_hub_families(),
           "usage": "--base hub:PRESET_NAME or --base hub:PATH_OF_A_PRESET_FOLDER"}
    info = {"versions": versions, "devices": devices, "backbones": backbones, "keras_hub": hub,
            "datasets": list_datasets(),
            "note": "any TensorFlow Datasets image-classification name works with --dataset"}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for k, v in versions.items():
        print(f"  {k:20s} {v}")
    print("devices:\n  " + "\n  ".join(devices))
    print("backbones (--base):")
    for n, b in backbones.items():
        print(f"  {n:18s} {b['input_size']}px  preprocess={b['preprocess']}")
    print("  or PATH.keras (your own backbone: raw 0-255 RGB in, features out)")
    print("  or hub:PRESET, a keras-hub preset name or folder" + ("" if hub["installed"] else
          " (needs the extra: pip install 'tlkit[hub]')") + "; the families that work:")
    for family, presets in hub["families"].items():
        print(f"    {family:20s} {presets}")
    print("datasets (--dataset): " + ", ".join(list_datasets()) + ", or any TFDS image-classification name")
    return 0


COMMANDS = {"finetune": cmd_finetune, "evaluate": cmd_evaluate, "lr-find": cmd_lr_find, "export": cmd_export,
            "predict": cmd_predict, "tune": cmd_tune, "distill": cmd_distill, "prune": cmd_prune, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Runs the tlkit command line; returns the exit code (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one line
        return int(e.code or 0)
    debug = bool(getattr(args, "debug", False))
    try:
        from tlkit.core.quiet import import_tensorflow

        import_tensorflow()  # after parsing: --help and argument errors never load TensorFlow
        return int(args.func(args) or 0)
    except TlkitError as e:
        if debug:
            traceback.print_exc()
        print(f"tlkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during training (tlkit.engine.interrupts.Interrupted)
        from tlkit.engine.resume import interrupt_message

        print(interrupt_message(e, list(sys.argv[1:] if argv is None else argv)), file=sys.stderr)
        return int(getattr(e, "exit_code", 130))


def run() -> None:
    """The process entry point (`tlkit`, `python -m tlkit`): `main`, then exit with its code.

    Before exiting, the objects alive are frozen out of the garbage collector (`gc.freeze`): the interpreter's
    shutdown otherwise runs full collections over the whole Keras and TensorFlow object graph, which took 1.5-4 s
    after a ResNet50 run (`benchmarks/frozen_e2e.py`, `of_which_exit`). Every output is written and closed by then.
    """
    import gc

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
