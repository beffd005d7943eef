"""Training: LoRA and full fine-tuning of any registered model family, on `accelerate` (one process to many).

Entry points: `imagezoo train` / `python -m imagezoo.train` (every flag of the seed's `train.py`, plus `--config`),
`imagezoo validate`, and `imagezoo.training.train(config)` from Python. A model family takes part by returning a
`TrainingAdapter` from its family object's `training_adapter(components)`.

Importing this package stays cheap (no torch) so the CLI can build its parser quickly.
"""

from __future__ import annotations

from typing import Any

from imagezoo.training.config import TrainConfig, make_config, parse_train_args

__all__ = ["TrainConfig", "TrainingAdapter", "make_config", "parse_train_args", "train"]


def train(config: TrainConfig, **kwargs: Any) -> Any:
    """Run a training job; see `imagezoo.training.trainer.train`."""
    from imagezoo.training.trainer import train as _train

    return _train(config, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "TrainingAdapter":
        from imagezoo.training.adapter import TrainingAdapter

        return TrainingAdapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
