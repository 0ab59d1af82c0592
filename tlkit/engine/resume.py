"""Resuming a run: the resumable run folder (configuration checks, stale files) and the command line that resumes
an interrupted run. The folder rules are `core.rundir`'s; the checkpoint files, and where each stage of a resumed
run starts (`RunState.start_of`), `engine.checkpoints`'s.

Example:
    cfg = open_run_dir("runs/try", cfg)     # with cfg.resume: refuses a changed configuration
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import signal

from tlkit.core import rundir
from tlkit.core.errors import ConfigError
from tlkit.engine.checkpoints import STATE_FILE, checkpoint_dir, epochs_saved

# Fields that may differ between an interrupted run and its resumption.
RESUME_FREE_FIELDS = ("output_dir", "overwrite", "resume", "cache", "tensorboard", "cache_features", "deterministic")
PATH_FIELDS = ("image_dir", "labels", "data_dir", "base", "weights", "output_dir")


def open_run_dir(out_dir: str, cfg):
    """Creates the resumable run folder of finetune; with `resume` checks that the interrupted run had the same
    configuration.

    Without `resume`, an `--overwrite` of an earlier run removes its checkpoints so that a later
    `--resume` never mixes two runs. With `resume`, a setting the first run resolved (`lr: auto` -> the
    number the learning-rate finder found) is taken from its `config.yaml` instead of being searched again.

    Returns:
        The configuration to run with.

    Raises:
        OutputExistsError: the folder is not empty and neither `overwrite` nor `resume` is set.
        ConfigError: `resume` with a configuration that differs from the interrupted run's.
    """
    rundir.check_output_dir(out_dir, cfg.overwrite, cfg.resume)
    if cfg.resume:
        saved = os.path.join(out_dir, "config.yaml")
        if os.path.isfile(os.path.join(checkpoint_dir(out_dir), STATE_FILE)) and os.path.isfile(saved):
            old = _saved_config(saved)
            if isinstance(cfg.train.lr, str) and not isinstance(old.train.lr, str):  # lr: auto, already found
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=old.train.lr))
            if cfg.data.augment == "auto" and old.data.augment != "auto":  # augment: auto, already decided
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=old.data.augment,
                                                                         flip=old.data.flip))
            diff = config_differences(old, cfg)
            if diff:
                raise ConfigError(f"Cannot resume {out_dir!r} with a different configuration ({'; '.join(diff[:4])})."
                                  f" Resume with the same flags, e.g. tlkit finetune --config {saved} --resume.")
        rundir.remove_stale_cache_files(os.path.join(out_dir, "cache"))  # a killed process's cache lock
    else:
        # Starting over (--overwrite): an earlier run's checkpoints and disk cache (other images, other size)
        # must not be picked up.
        import shutil

        for folder in (checkpoint_dir(out_dir), os.path.join(out_dir, "cache")):
            if os.path.isdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
    rundir.prepare_run_dir(out_dir, overwrite=True)
    return cfg


def _saved_config(path: str):
    from tlkit.core.config_io import config_from_dict, load_yaml

    try:
        return config_from_dict(load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"Cannot resume: {path} is not a valid tlkit config ({e}).") from None


def config_differences(saved, cfg) -> list[str]:
    """`section.key: saved -> now` for every setting that differs from a run's saved config (a `config.yaml` path
    or a `FinetuneConfig`), paths compared as absolute paths; what may change on resume left out."""
    from tlkit.core.config_io import absolute_paths, config_to_dict, differences

    if isinstance(saved, (str, os.PathLike)):
        saved = _saved_config(os.fspath(saved))
    return differences(config_to_dict(absolute_paths(saved)), config_to_dict(absolute_paths(cfg)),
                       ignore=RESUME_FREE_FIELDS, paths=PATH_FIELDS)


def resume_command(argv: list[str], run_dir: str | None) -> str:
    """The command line that resumes an interrupted `tlkit finetune`: the same flags plus `--resume`."""
    args = list(argv)
    flags = {a.split("=", 1)[0] for a in args}
    if run_dir and "--output-dir" not in flags:
        args += ["--output-dir", run_dir]
    if "--resume" not in flags:
        args.append("--resume")
    if "--no-resume" in flags:
        args.remove("--no-resume")
    return "tlkit " + shlex.join(args)


def interrupt_message(e: KeyboardInterrupt, argv: list[str]) -> str:
    """The line(s) the CLI prints on Ctrl-C or SIGTERM."""
    name = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
    run_dir = getattr(e, "run_dir", None)
    if not argv or argv[0] != "finetune":
        return f"tlkit: interrupted ({name})."
    if not run_dir:  # outside training (loading data, writing outputs): resumable when a checkpoint exists
        given = _flag_value(argv, "--output-dir")
        if not given or not os.path.isfile(os.path.join(checkpoint_dir(given), STATE_FILE)):
            return f"tlkit: interrupted ({name})."
        run_dir, e.epochs_done = given, epochs_saved(given)  # type: ignore[attr-defined]
    done = getattr(e, "epochs_done", 0)
    saved = (f"epoch {done} is the last one saved in {checkpoint_dir(run_dir)}" if done
             else "no epoch had finished yet")
    return f"tlkit: interrupted ({name}); {saved}. Resume with:\n  {resume_command(argv, run_dir)}"


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
