"""Training from YAML configs: ``config`` (schema), ``data``, ``optim``, ``step`` (the pure train
step), ``sharding``, ``checkpoint``, ``metrics`` and ``loop`` (the run). The names below load on
first use (importing ``transformax.train.interrupt`` does not load JAX)."""

from transformax import _lazy

_EXPORTS = {"CheckpointError": ".checkpoint", "ConfigError": ".config", "RunConfig": ".config",
            "load": ".config", "Interrupted": ".interrupt", "Result": ".loop",
            "TrainingDiverged": ".loop", "load_run": ".loop", "train": ".loop",
            "RunFolderBusy": ".runlock", "TrainState": ".step", "make_eval_step": ".step",
            "make_train_step": ".step"}

__all__ = sorted(_EXPORTS)
__getattr__ = _lazy.attributes(__name__, _EXPORTS)
