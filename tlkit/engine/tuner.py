"""The tuner of `tune`: KerasTuner's `Tuner` with tlkit's trial bookkeeping, the oracles, and the distributed
chief that serves the oracle to the workers. The search space is `engine.tuning`'s.

Example:
    tuner = TlkitTuner(make_oracle(tc, seed=0, max_epochs=3), hm, directory="runs/t", project_name="search")
    run_search(tuner, callbacks=[])
"""
from __future__ import annotations

import os
import time
import traceback

import keras
import keras_tuner as kt
import tensorflow as tf
from keras_tuner.engine.trial import TrialStatus  # public

from tlkit.core import config as C
from tlkit.core import rundir
from tlkit.core.verb_configs import TUNERS, TuneConfig, maximised
from tlkit.core.errors import (BackboneError, ConfigError, DataError, OfflineError, OutputExistsError,
                               TrainingError, first_line)
from tlkit.core import private
from tlkit.engine.tuning import TRIAL_INFO_FILE, TlkitHyperModel, last_line
from tlkit.engine.weights_format import load_weights

FATAL_ERRORS = (ConfigError, DataError, BackboneError, OfflineError, OutputExistsError)


class _FatalTrialError(kt.errors.FatalError):
    """Carries a configuration error out of KerasTuner's loop, which only lets `FatalError` through."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


class TlkitTuner(kt.Tuner):
    """KerasTuner's `Tuner` with tlkit's trial bookkeeping.

    - a failed trial (NaN, out of memory, any exception) is marked `FAILED` with a one-line reason, written
      beside KerasTuner's `trial.json` (so a distributed chief sees it too); a `FATAL_ERRORS` error stops
      the search;
    - the Keras session is cleared after every trial (KerasTuner also clears it before every build);
    - the search space is declared without building a model;
    - Hyperband's promoted trials continue from their parent's weights;
    - the distributed chief serves the oracle (KerasTuner's servicer) and returns as soon as the workers are
      done (KerasTuner's own loop polls every 20 s).
    """

    def __init__(self, oracle: kt.Oracle, hypermodel: TlkitHyperModel, hyperband: bool = False, **kwargs):
        self.hyperband = hyperband
        self._t0: dict[str, float] = {}
        self._reasons: dict[str, tuple[str, str]] = {}
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)
        hypermodel.keep_checkpoints = hyperband

    def _populate_initial_space(self):
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def on_trial_begin(self, trial):
        self._t0[trial.trial_id] = time.time()
        self.hypermodel.execution = 0
        super().on_trial_begin(trial)

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        if self.hyperband and "tuner/epochs" in hp.values:
            kwargs["epochs"] = hp.values["tuner/epochs"]
            kwargs["initial_epoch"] = hp.values["tuner/initial_epoch"]
        bs = hp.values.get("batch_size")
        try:
            return super().run_trial(trial, *args, **kwargs)
        except kt.errors.FatalError:
            raise
        except FATAL_ERRORS as e:
            raise _FatalTrialError(e) from e
        except kt.errors.FailedTrialError as e:
            self._fail(trial, str(e))
        except TrainingError as e:
            self._fail(trial, str(e))
        except (tf.errors.ResourceExhaustedError, MemoryError) as e:
            self._fail(trial, f"out of memory with batch size {bs}: {first_line(e)}")
        except Exception as e:  # anything else inside a trial fails that trial only
            self._fail(trial, f"{type(e).__name__}: {first_line(e)}")

    def _fail(self, trial, reason: str):
        self._reasons[trial.trial_id] = (reason, traceback.format_exc())
        raise kt.errors.FailedTrialError(reason)

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        # KerasTuner 1.4.8 imports tensorboard here on every trial, needed or not: only when it is used.
        if any(c.__class__.__name__ == "TensorBoard" for c in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)

    def _build_hypermodel(self, hp):
        model = super()._build_hypermodel(hp)
        if self.hyperband and "tuner/trial_id" in hp.values:
            load_weights(model, private.kt_checkpoint_fname(self, hp.values["tuner/trial_id"]))
        return model

    def on_trial_end(self, trial):
        reason, tb = self._reasons.pop(trial.trial_id, ("", ""))
        if not reason and trial.status != TrialStatus.COMPLETED and trial.message:
            reason = last_line(trial.message)
        seconds = round(time.time() - self._t0.pop(trial.trial_id, time.time()), 2)
        info = {"trial_id": trial.trial_id, "tuner_id": self.tuner_id, "seconds": seconds,
                "status": str(trial.status), "reason": reason, "traceback": tb}
        rundir.write_json(os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_INFO_FILE), info)
        if reason:
            print(f"[tlkit] trial {trial.trial_id} failed: {reason}", flush=True)
        try:
            super().on_trial_end(trial)
        finally:
            # Release the trial's layers and graphs now; KerasTuner clears (and collects garbage) again
            # before the next build.
            keras.backend.clear_session(free_memory=False)

    def search(self, *fit_args, **fit_kwargs):
        if not private.kt_is_chief_oracle():
            return super().search(*fit_args, **fit_kwargs)
        self.oracle.verbose = fit_kwargs.get("verbose", 1)
        self.save()
        _serve_oracle(self.oracle)


def _serve_oracle(oracle: kt.Oracle, poll: float = 0.25) -> None:
    """Serves `oracle` to the workers over gRPC until every worker has been told to stop."""
    import grpc
    from concurrent import futures

    protos, oracle_chief = private.kt_oracle_servicing()
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise ConfigError(f"The chief cannot listen on {address} (KERASTUNER_ORACLE_IP/KERASTUNER_ORACLE_PORT): "
                          "is the port in use or the address not this machine's?")
    server.start()
    print(f"[tlkit] chief: oracle serving on {address}; start the workers with KERASTUNER_TUNER_ID=tuner0, "
          "tuner1, ...", flush=True)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll)
    finally:
        server.stop(grace=2).wait()


def role() -> str:
    """`single`, `chief` or `worker`, from KerasTuner's environment variables."""
    try:
        if not private.kt_has_chief_oracle():
            return "single"
    except RuntimeError as e:
        raise ConfigError(f"Distributed tuning: {first_line(e)}") from None
    return "chief" if private.kt_is_chief_oracle() else "worker"


def make_oracle(tc: TuneConfig, seed: int, max_epochs: int) -> kt.Oracle:
    """The KerasTuner oracle of `tc.tuner`."""
    direction = "max" if maximised(tc.objective) else "min"
    common = dict(objective=kt.Objective(tc.objective, direction), seed=seed, max_retries_per_trial=0,
                  max_consecutive_failed_trials=tc.max_consecutive_failures)
    if tc.tuner == "random":
        return kt.oracles.RandomSearchOracle(max_trials=tc.max_trials, **common)
    if tc.tuner == "bayesian":
        try:
            import sklearn  # noqa: F401  (KerasTuner's Gaussian process)
        except ImportError:
            raise ConfigError("--tuner bayesian needs scikit-learn (pip install scikit-learn), or use --tuner "
                              "random.") from None
        return kt.oracles.BayesianOptimizationOracle(max_trials=tc.max_trials, **common)
    if tc.tuner == "grid":
        return kt.oracles.GridSearchOracle(max_trials=tc.max_trials, **common)
    if tc.tuner == "hyperband":
        oracle = kt.oracles.HyperbandOracle(max_epochs=max(int(max_epochs), 1), factor=3, **common)
        oracle.max_trials = tc.max_trials  # a cap: Hyperband itself decides how many brackets it runs
        return oracle
    raise ConfigError(f"Unknown tuner {tc.tuner!r}. Choose one of: {', '.join(TUNERS)}.")


def run_search(tuner: TlkitTuner, callbacks: list) -> None:
    """`tuner.search`, a failed trial printed as one line (its traceback goes to its `tlkit_trial.json`); a fatal
    error inside a trial re-raised as itself."""
    with private.kt_quiet_failures():
        try:
            tuner.search(callbacks=callbacks, verbose=1)
        except _FatalTrialError as e:
            raise e.original from None
