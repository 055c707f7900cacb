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

    errors: list[type[BaseException]] = [ConfigError, CheckpointError, ExportError, FileNotFoundError]
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
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            return 2

    return wrapper
