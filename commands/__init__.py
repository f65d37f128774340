"""The command lines: `python -m commands.sample`, `commands.evaluate`, `commands.compare` (and `training.train`,
`training.train_lora`, `training.train_vae`, `evaluation.train_mnist_classifier` and the `benchmarks/` scripts) all run
through `run`.

A user's mistake (a bad argument, a missing file, a config that cannot train) is raised as a `ValueError`
(`ConfigError` is one) or a `FileNotFoundError` with a message that says what to do; `run` prints it as one
`error:` line and exits with status 2. Anything else is a bug and raises with its traceback.
"""

import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, FileNotFoundError)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call `main(argv)` (default: the process's arguments); a user error becomes one line on stderr and exit 2."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
