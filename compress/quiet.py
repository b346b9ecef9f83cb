"""Keep the libraries' own output (progress bars, warnings, loguru lines) in a log file, off the user's screen."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def library_output_to(path: Path) -> Iterator[None]:
    """Send everything written to stderr (file descriptor 2, so C++ and tqdm too) and loguru to `path`."""
    # llm-compressor resets loguru (and logs to stdout) when first imported: quiet its console, let the
    # import happen, then take loguru over.
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    import llmcompressor  # noqa: F401
    from loguru import logger

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 2)
        logger.remove()
        logger.add(log, level="DEBUG")
        try:
            yield
        finally:
            logger.remove()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
