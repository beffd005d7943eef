"""`python -m imagezoo.train`: the seed's `train.py`, launchable with `accelerate launch -m imagezoo.train ...`.

Accepts every flag of the seed's training script with the same meaning (see `imagezoo.training.config.SEED_FLAGS`),
plus `--config FILE` (YAML/JSON) and imagezoo's additions. Exit status: 0 done, 2 bad settings or data, 130 interrupted
(a resumable state was saved).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from imagezoo.errors import ImagezooError

logger = logging.getLogger("imagezoo.train")

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, train, and return the exit status."""
    from imagezoo.training.config import parse_train_args

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_train_args(argv)
        from imagezoo.training.trainer import train

        result = train(config)
    except ImagezooError as exc:
        logger.error("%s", exc)
        return 2
    return EXIT_INTERRUPTED if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
