"""Training from YAML configs: ``config`` (schema), ``data``, ``optim``, ``step`` (the pure train
step), ``sharding``, ``checkpoint``, ``metrics`` and ``loop`` (the run)."""

from transformax.train.config import ConfigError, RunConfig, load
from transformax.train.loop import Result, TrainingDiverged, load_run, train
from transformax.train.step import TrainState, make_eval_step, make_train_step

__all__ = ["ConfigError", "Result", "RunConfig", "TrainState", "TrainingDiverged", "load",
           "load_run", "make_eval_step", "make_train_step", "train"]
