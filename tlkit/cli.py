"""Command line: YAML -> config -> flag overrides -> one library call -> exit code. argparse only.

Every `FinetuneConfig` field is a flag (`--field-name`), its help taken from the dataclass docstring, so
flags, YAML keys and the Python API cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import traceback
import typing
from typing import Any

from tlkit.core import config as C
from tlkit.core.errors import ConfigError, TlkitError

CHOICES = {
    "augment": C.AUGMENT_PRESETS, "cache": C.CACHE_CHOICES, "strategy": C.STRATEGIES, "optimizer": C.OPTIMIZERS,
    "schedule": C.SCHEDULES, "precision": C.PRECISIONS, "xla": C.XLA_CHOICES, "distribute": C.DISTRIBUTE_CHOICES,
}
METAVARS = {"dataset": "NAME", "image_dir": "DIR", "labels": "FILE.csv", "data_dir": "DIR", "base": "NAME|PATH.keras",
            "weights": "imagenet|none|PATH", "output_dir": "DIR", "early_stopping": "PATIENCE",
            "lr": "LR|auto", "class_weight": "none|balanced|W1,W2,..."}


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
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) > 1:  # e.g. lr: float | str ("auto"): pass the text on, the config coerces and validates it
        return str
    return args[0] if args else hint


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Adds one flag per config field (default None: only given flags override the YAML/defaults)."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML configuration (nested sections or flat keys); "
                        "flags override it.")
    groups = list(C.SECTIONS.items()) + [("run", C.FinetuneConfig)]
    for section, cls in groups:
        group = parser.add_argument_group(f"{section} options")
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in C.SECTIONS or f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            typ = _field_type(cls, f.name)
            help_text = docs.get(f.name, "")
            if typ is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                group.add_argument(flag, dest=f.name, type=typ, default=None, choices=CHOICES.get(f.name),
                                   metavar=METAVARS.get(f.name, f.name.upper() if f.name not in CHOICES else None),
                                   help=help_text)


def config_from_args(args: argparse.Namespace) -> C.FinetuneConfig:
    """Defaults <- YAML (`--config`) <- flags."""
    cfg = C.load_config(args.config) if getattr(args, "config", None) else C.FinetuneConfig()
    index = C.field_index()
    given = {k: v for k, v in vars(args).items() if k in index and v is not None}
    return C.config_from_dict(given, cfg)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump: finetune's usage alone is 60 lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlkit", description="Transfer learning for Keras 3: fine-tune pretrained "
                                     "backbones on TFDS datasets or image folders, evaluate, inspect.")
    _add_common(parser)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("finetune", help="Fine-tune a pretrained backbone and write a run folder.",
                       description="Fine-tune a pretrained backbone. Outputs in --output-dir: config.yaml, labels.txt, "
                       "model.keras, history.csv, metrics.json. Example: tlkit finetune --base resnet50 --dataset "
                       "oxford_flowers102")
    add_config_flags(p)
    _add_common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="Evaluate a run folder or .keras model on a dataset split.",
                       description="Evaluate a model: prints a table and writes metrics.json (loss, top-1, top-5, "
                       "mean per-class accuracy, per-class precision/recall/F1).")
    p.add_argument("model", metavar="MODEL", help="A run folder (model.keras + labels.txt) or a .keras file.")
    p.add_argument("--dataset", metavar="NAME", help="TFDS name or shapes (default: the run's own data).")
    p.add_argument("--image-dir", metavar="DIR", help="A folder of class sub-folders (default: the run's own data).")
    p.add_argument("--data-dir", metavar="DIR", help="TensorFlow Datasets data folder.")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="Split to evaluate (test falls back to val when there is none). Default: test.")
    p.add_argument("--batch-size", type=int, default=None, help="Batch size (default: the run's, else 32).")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="Where to write metrics.json, confusion_matrix.png, confusion_matrix.csv and misclassified.png "
                   "(default: RUN/eval-SPLIT for a run folder; a .keras file needs it to write files).")
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="Class names, one per line, index = label (default: labels.txt beside the model, else the "
                   "data's class names); a .csv file is a table of images and labels to evaluate on instead, its "
                   "relative paths under --image-dir.")
    p.add_argument("--num-misclassified", type=int, default=None, metavar="N",
                   help="Worst errors drawn in misclassified.png and listed in metrics.json (default: 16).")
    p.add_argument("--tta", type=int, default=None, metavar="N",
                   help="Test-time augmentation: average the probabilities of each image and N deterministic views "
                   "(flip, centre crop, its flip, corner crops, ...; crops at the scale the run was trained on), 0-11; "
                   "metrics.json records it (default: 0, off).")
    p.add_argument("--ood", metavar="DIR", default=None,
                   help="A folder of images of none of the classes: report AUROC and FPR@95%%TPR of the scores msp, "
                   "energy, mahalanobis and knn, and store in the run folder (ood.json) the top-probability threshold below "
                   "which predict answers 'unknown' (the one that accepts 95%% of the validation images).")
    p.add_argument("--reject-below", type=float, default=None, metavar="P",
                   help="Store this threshold (0 < P < 1) on the top probability instead of the 95%%-of-validation one.")
    p.add_argument("--json", action="store_true", help="Print the metrics as JSON instead of a table.")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("lr-find", help="Find a learning rate with an LR range test (fastai's lr_find).",
                       description="Train the stage you are about to train for up to --num-steps batches while the "
                       "learning rate grows exponentially from --start-lr to --end-lr, stop when the loss diverges, "
                       "restore the weights; write lr_find.png and lr_find.json into --output-dir and print the "
                       "suggested --lr (valley; steepest descent too). Takes finetune's flags. Example: tlkit lr-find "
                       "--base resnet50 --dataset oxford_flowers102")
    add_config_flags(p, skip=("lr",))
    g = p.add_argument_group("lr-find options")
    g.add_argument("--start-lr", type=float, default=None, metavar="LR", help="First learning rate (default: 1e-7).")
    g.add_argument("--end-lr", type=float, default=None, metavar="LR", help="Last learning rate (default: 10).")
    g.add_argument("--num-steps", type=int, default=None, metavar="N", help="Batches to run at most (default: 100).")
    g.add_argument("--stage", default=None, metavar="NAME", help="Stage of the strategy's plan to search: head, "
                   "finetune, full, top_k or unfreeze_N (default: the first stage, whose LR is --lr).")
    g.add_argument("--json", action="store_true", help="Print the result as JSON.")
    _add_common(p)
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("export", help="Export a run folder or .keras model (keras, savedmodel, tflite, onnx), checked.",
                       description="Export a model with its resize and labels, then check it: sample images go "
                       "through the export and the Keras model; top-1 agreement and max |dp| are printed and written to "
                       "export.json (exit 1 below the threshold). Writes model_card.md beside the export. Example: "
                       "tlkit export runs/x --format tflite --quantize int8")
    p.add_argument("model", metavar="MODEL", help="A run folder (model.keras + labels.txt + config.yaml) or a .keras file.")
    p.add_argument("--format", required=True, choices=("keras", "savedmodel", "tflite", "onnx"),
                   help="keras (.keras + labels.txt), savedmodel (uint8-image and encoded-bytes signatures), "
                   "tflite, or onnx (needs the extra: pip install 'tlkit[onnx]').")
    p.add_argument("--output", metavar="PATH", default=None,
                   help="Export folder, or the artifact path (.keras, .tflite, .onnx; a SavedModel is a folder). "
                   "Default: RUN/export/FORMAT[-QUANTIZE].")
    p.add_argument("--quantize", default="none", choices=("none", "float16", "dynamic", "int8"),
                   help="TFLite only: none, float16 weights, dynamic (int8 weights), int8 (full integer, calibrated). "
                   "Default: none.")
    p.add_argument("--int8-input", default="uint8", choices=("uint8", "int8", "float32"),
                   help="With --quantize int8: input and output type (uint8 takes raw pixels). Default: uint8.")
    p.add_argument("--dataset", metavar="NAME", help="Data for the check and int8 calibration: TFDS name or shapes "
                   "(default: the run's own data).")
    p.add_argument("--image-dir", metavar="DIR", help="A folder of class sub-folders, instead of --dataset.")
    p.add_argument("--data-dir", metavar="DIR", help="TensorFlow Datasets data folder.")
    p.add_argument("--calibration-steps", type=int, default=100, metavar="N",
                   help="Calibration images for --quantize int8 (training split first). Default: 100.")
    p.add_argument("--check-images", nargs="+", metavar="PATH", default=None,
                   help="Image files or folders for the parity check (default: the data's validation split first).")
    p.add_argument("--num-check", type=int, default=32, metavar="N", help="Images in the parity check. Default: 32.")
    p.add_argument("--min-agreement", type=float, default=None, metavar="F",
                   help="Required top-1 agreement, 0..1 (default: 1.0 for float exports, 0.95 dynamic, 0.90 int8).")
    p.add_argument("--max-diff", type=float, default=None, metavar="F",
                   help="Largest allowed |p_export - p_keras|, inf for no bound (default: 1e-3 float exports, 2e-2 "
                   "float16, no bound for dynamic and int8).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing export at --output.")
    p.add_argument("--json", action="store_true", help="Print export.json's content instead of the summary lines.")
    _add_common(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="Predict the classes of images with any model or export.",
                       description="Predict the top classes of image files and folders with a run folder, .keras, "
                       "SavedModel folder, .tflite or .onnx; unreadable files are reported and skipped. Example: "
                       "tlkit predict runs/x photos/ --top-k 3")
    p.add_argument("model", metavar="MODEL", help="A run folder, .keras, SavedModel or export folder, .tflite or .onnx.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="Image files and/or folders (searched recursively).")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="Classes shown per image. Default: 5.")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="Images per model call. Default: 32.")
    p.add_argument("--tta", type=int, default=None, metavar="N",
                   help="Test-time augmentation: average each image's probabilities over it and N deterministic views "
                   "(flip, centre crop, its flip, corner crops, ...), 0-11 (default: 0, off).")
    p.add_argument("--reject-below", type=float, default=None, metavar="P",
                   help="Answer 'unknown' for an image whose top probability is below P, 0 < P < 1 (default: the "
                   "threshold tlkit evaluate --ood stored with the run or export, if any).")
    p.add_argument("--explain", metavar="DIR", default=None,
                   help="Write Grad-CAM overlays into DIR: IMAGE_gradcam.png (the heat map of the predicted class over "
                   "each image) and gradcam.csv; needs a run folder or .keras model (not .tflite, ONNX, SavedModel).")
    p.add_argument("--json", action="store_true", help="Print JSON (predictions and skipped files) for scripts.")
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("tune", help="Search learning rate, batch size and more with KerasTuner; writes best_config.yaml.",
                       description="Hyperparameter search with KerasTuner on the same model and data code as finetune: "
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
                       "resnet50 --dataset oxford_flowers102 --tuner bayesian --max-trials 20 --trial-epochs 3")
    add_config_flags(p)
    add_tune_flags(p)
    _add_common(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("distill", help="Distil a fine-tuned teacher into a small student; writes the student's run folder.",
                       description="Knowledge distillation: trains the student backbone (--student) plus head with "
                       "alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)); the "
                       "teacher runs in inference mode (its logits are computed once when --augment none). The data "
                       "defaults to the teacher run's; every finetune flag applies to the student. Outputs a normal run "
                       "folder (model.keras, labels.txt, config.yaml, history.csv with ce/kl, metrics.json with the "
                       "teacher/student table: accuracy, parameters, size, CPU latency). Example: tlkit distill "
                       "--teacher runs/resnet50-flowers --student mobilenetv2 --temperature 4 --alpha 0.5")
    p.add_argument("--student", metavar="NAME|PATH.keras", default=None,
                   help="Student backbone: a registered name (e.g. mobilenetv2) or a .keras backbone (sets --base).")
    _add_dataclass_flags(p, C.DistillConfig, "distillation options", metavars={"teacher": "RUN_DIR|MODEL.keras"})
    add_config_flags(p, skip=("base",))
    _add_common(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("prune", help="Magnitude-prune a run's model with a sparsity schedule and fine-tune to recover.",
                       description="Magnitude pruning for Keras 3: zeroes the smallest weights of every Conv/Dense "
                       "kernel (not the classification layer unless --prune-head), raising the sparsity on a schedule "
                       "while fine-tuning on the run's data, so each pruned kernel ends exactly --sparsity sparse. "
                       "Prints and writes (metrics.json) accuracy against sparsity and the zipped model size. Outputs a "
                       "run folder (default RUN_DIR-prunedNN). Example: tlkit prune runs/resnet50-flowers --sparsity 0.5 "
                       "--schedule polynomial --epochs 2")
    p.add_argument("run_dir", metavar="RUN_DIR", help="The run folder to prune (model.keras, labels.txt, config.yaml).")
    _add_dataclass_flags(p, C.PruneConfig, "pruning options", skip=("run_dir",),
                         choices={"schedule": C.PRUNE_SCHEDULES}, metavars={"output_dir": "DIR", "sweep": "S1,S2,..."})
    _add_common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("info", help="Versions, devices, registered backbones and datasets.",
                       description="Print versions, devices, registered backbones and datasets.")
    p.add_argument("--json", action="store_true", help="Print as JSON.")
    _add_common(p)
    p.set_defaults(func=cmd_info)
    return parser


def cmd_finetune(args: argparse.Namespace) -> int:
    from tlkit.verbs.finetune import finetune

    finetune(config_from_args(args))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tlkit.engine.metrics import per_class_table, summary_table
    from tlkit.verbs.evaluate import evaluate

    data = C.DataConfig()
    seed = 42
    run_cfg = os.path.join(args.model, "config.yaml") if os.path.isdir(args.model) else None
    if run_cfg and os.path.isfile(run_cfg):
        rc = C.load_config(run_cfg)
        data, seed = rc.data, rc.seed
    table = args.labels if args.labels and args.labels.lower().endswith(".csv") else None  # data, not class names
    if args.dataset or args.image_dir or table:
        data = dataclasses.replace(data, dataset=args.dataset, image_dir=args.image_dir, labels=table)
    if args.data_dir:
        data = dataclasses.replace(data, data_dir=args.data_dir)
    if data.dataset is None and data.image_dir is None and data.labels is None:
        raise ConfigError("evaluate needs --dataset NAME or --image-dir DIR (or a run folder that names its data).")
    labels = None
    if args.labels and not table:
        from tlkit.models.classifier import read_labels

        if not os.path.isfile(args.labels):
            raise ConfigError(f"--labels {args.labels!r} is not a file.")
        labels = read_labels(args.labels)
    extra = {} if args.num_misclassified is None else {"num_misclassified": args.num_misclassified}
    if args.tta is not None:
        extra["tta"] = args.tta
    if args.ood is not None or args.reject_below is not None:
        extra.update(ood=args.ood, reject_below=args.reject_below)
    m = evaluate(args.model, data, split=args.split, batch_size=args.batch_size, output_dir=args.output_dir, seed=seed,
                 class_names=labels, **extra)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "confusion_matrix"}, indent=2))
    else:
        if m.get("tta"):
            print(f"[tlkit] test-time augmentation: mean of {m['tta']['n'] + 1} views ({', '.join(m['tta']['views'])})")
        print(summary_table({m["split"]: m}))
        print()
        print(per_class_table(m))
        if m.get("most_confused"):
            print("\nmost confused (true -> predicted: count): " + "; ".join(
                f"{c['true']} -> {c['predicted']}: {c['count']}" for c in m["most_confused"][:5]))
        if m.get("ood"):
            from tlkit.engine.ood import ood_table

            print("\n" + ood_table(m["ood"]))
            if m["ood"].get("stored"):
                print(f"[tlkit] threshold stored in {m['ood']['stored']}: predict answers 'unknown' below it")
        if m.get("output_dir"):
            print(f"\n[tlkit] metrics.json, confusion_matrix.png, confusion_matrix.csv, misclassified.png and "
                  f"misclassified_gradcam.png written to {m['output_dir']}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from tlkit.verbs.lr_find import lr_find

    kwargs = {k: getattr(args, k) for k in ("start_lr", "end_lr", "num_steps", "stage") if getattr(args, k) is not None}
    result = lr_find(config_from_args(args), **kwargs)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(f"suggested --lr {result.suggestion:.2e}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tlkit.verbs.export import ParityError, export

    try:
        r = export(args.model, format=args.format, output=args.output, quantize=args.quantize,
                   int8_input=args.int8_input, dataset=args.dataset, image_dir=args.image_dir, data_dir=args.data_dir,
                   calibration_steps=args.calibration_steps, check_images=args.check_images, num_check=args.num_check,
                   min_agreement=args.min_agreement, max_diff=args.max_diff,
                   overwrite=args.overwrite, verbose=not args.json)
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

    extra = {} if args.tta is None else {"tta": args.tta}
    if args.reject_below is not None:
        extra["reject_below"] = args.reject_below
    if args.explain is not None:
        extra["explain"] = args.explain
    r = predict(args.model, args.inputs, top_k=args.top_k, batch_size=args.batch_size, progress=not args.json, **extra)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        print(r.table())
    for f, why in r.skipped:
        print(f"tlkit: skipped {f}: {why}", file=sys.stderr)
    if r.explained is not None and not args.json:
        print(f"[tlkit] {len(r.explained)} Grad-CAM overlays written to {args.explain}")
    return 0


TUNE_CHOICES = {"tuner": C.TUNERS, "objective": C.TUNE_OBJECTIVES, "two_stage_lr": C.TWO_STAGE_LR_CHOICES}
TUNE_METAVARS = {"lr_range": ("LO", "HI"), "batch_sizes": "N", "search": "DIM[,DIM...]", "max_trials": "N",
                 "executions_per_trial": "N", "trial_epochs": "N", "grid_points": "N", "max_consecutive_failures": "N"}


def add_tune_flags(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per `TuneConfig` field (default None: only given flags override the YAML `tune:` section)."""
    group = parser.add_argument_group("search options (tune)")
    docs = _attribute_docs(C.TuneConfig)
    for f in dataclasses.fields(C.TuneConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), docs.get(f.name, "")
        typ = _field_type(C.TuneConfig, f.name)
        if typ is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "lr_range":
            group.add_argument(flag, dest=f.name, type=float, nargs=2, default=None, metavar=("LO", "HI"),
                               help=help_text)
        elif f.name == "batch_sizes":
            group.add_argument(flag, dest=f.name, type=int, nargs="+", default=None, metavar="N", help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=typ, default=None, choices=TUNE_CHOICES.get(f.name),
                               metavar=None if f.name in TUNE_CHOICES else TUNE_METAVARS.get(f.name, f.name.upper()),
                               help=help_text)


def cmd_tune(args: argparse.Namespace) -> int:
    from tlkit.core.tune_config import load_tune_config, tune_config_from_dict
    from tlkit.verbs.tune import tune

    cfg, tc = load_tune_config(args.config) if getattr(args, "config", None) else (C.FinetuneConfig(), C.TuneConfig())
    index = C.field_index()
    cfg = C.config_from_dict({k: v for k, v in vars(args).items() if k in index and v is not None}, cfg)
    names = {f.name for f in dataclasses.fields(C.TuneConfig)}
    tc = tune_config_from_dict({k: v for k, v in vars(args).items() if k in names and v is not None}, tc)
    tune(cfg, tc)
    return 0


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = (),
                         choices: dict[str, tuple[str, ...]] | None = None,
                         metavars: dict[str, str] | None = None) -> None:
    """One flag per field of a verb's config dataclass (help from its `Attributes:`; default None = not given)."""
    group = parser.add_argument_group(title)
    docs = _attribute_docs(cls)
    choices, metavars = choices or {}, metavars or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = _field_type(cls, f.name)
        if typ is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=docs.get(f.name, ""))
        else:
            group.add_argument(flag, dest=f.name, type=typ, default=None, choices=choices.get(f.name),
                               metavar=None if f.name in choices else metavars.get(f.name, f.name.upper()),
                               help=docs.get(f.name, ""))


def _dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return cls(**{**given, **extra})


def cmd_distill(args: argparse.Namespace) -> int:
    from tlkit.verbs.distill import distill, teacher_run_config

    dcfg = _dataclass_from_args(C.DistillConfig, args).validate()
    base = C.load_config(args.config) if getattr(args, "config", None) else teacher_run_config(dcfg.teacher)
    index = C.field_index()
    given = {k: v for k, v in vars(args).items() if k in index and v is not None}
    if args.student is None and "base" not in given:
        raise ConfigError("distill needs a student backbone: --student NAME (e.g. mobilenetv2) or --student PATH.keras.")
    if args.student is not None:
        given["base"] = args.student
    distill(C.config_from_dict(given, base), dcfg)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from tlkit.verbs.prune import prune

    prune(_dataclass_from_args(C.PruneConfig, args, run_dir=args.run_dir))
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


if __name__ == "__main__":
    sys.exit(main())
