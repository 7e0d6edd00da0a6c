"""Console logging for runners and the CLI."""

import logging

from rich.logging import RichHandler


def setup_logging(level: str = "INFO") -> None:
    """Log `lm_saes_core` records to the console once (idempotent, leaves other libraries' loggers alone)."""
    logger = logging.getLogger("lm_saes_core")
    logger.setLevel(level)
    if not any(isinstance(handler, RichHandler) for handler in logger.handlers):
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
