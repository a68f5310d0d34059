"""Training from YAML configs: ``config`` (schema), ``data``, ``optim``, ``step`` (the pure train
step), ``sharding``, ``checkpoint``, ``metrics`` and ``loop`` (the run)."""

from transformax.train.checkpoint import CheckpointError
from transformax.train.config import ConfigError, RunConfig, load
from transformax.train.interrupt import Interrupted
from transformax.train.loop import Result, TrainingDiverged, load_run, train
from transformax.train.runlock import RunFolderBusy
from transformax.train.step import TrainState, make_eval_step, make_train_step

__all__ = ["CheckpointError", "ConfigError", "Interrupted", "Result", "RunConfig",
           "RunFolderBusy", "TrainState", "TrainingDiverged", "load", "load_run",
           "make_eval_step", "make_train_step", "train"]
