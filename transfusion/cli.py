"""Shared command-line behaviour: expected failures print one clear line and exit non-zero, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
import warnings


def expected_errors() -> tuple[type[BaseException], ...]:
    from transfusion.checkpoint.dcp import CheckpointError
    from transfusion.checkpoint.export import ExportError
    from transfusion.config import ConfigError
    from transfusion.latents.prepare import LatentShapeError
    from transfusion.pretrained.adapters import PretrainedError
    from transfusion.tokenizer import TokenizerError

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, ExportError, FileNotFoundError, LatentShapeError,
                                         PretrainedError, TokenizerError]
    try:
        from data_pipelines.loader import DataError
        from data_pipelines.shards import ShardSpecError

        errors += [DataError, ShardSpecError]
    except ImportError:
        pass
    return tuple(errors)


def fail_cleanly(main):
    """Decorator for CLI mains: known errors -> 'error: ...' on stderr, exit 2 (1 for data errors).
    Set TRANSFUSION_DEBUG=1 to see the traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # torchdata's StatefulDataLoader calls a deprecated torch API on construction; it is noise to our users.
        warnings.filterwarnings("ignore", message=".*set_vital.*is deprecated")
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except expected_errors() as e:
            if os.environ.get("TRANSFUSION_DEBUG"):
                raise
            msg = one_line(e)
            print(f"error: {msg}", file=sys.stderr)
            return 2

    return wrapper


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line. An exception re-raised from a DataLoader worker carries the worker's
    traceback in its text; its last line is the original ``Type: message``."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = text.splitlines()
    if "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return lines[0]
