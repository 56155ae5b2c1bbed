"""`python -m shdcli` and the `shd` script.

Importing the CLI loads torch and transformers, which takes seconds: a Ctrl-C then has nothing to save, and
without this handler it would end in a KeyboardInterrupt traceback. cli.main() handles every later one.
A SIGINT this process started with ignored (a job a non-interactive shell ran with `&`) stays ignored, as
Python itself leaves it.
"""

import os
import signal
import sys
from types import FrameType


def _stopped_while_starting(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("stopped by SIGINT while starting; nothing was written; run the command again\n")
    sys.stderr.flush()
    # os._exit, not sys.exit: the signal can land inside torch's C++ import code (pybind11), where a
    # SystemExit becomes std::terminate and SIGABRT. Nothing is open or written yet: nothing to clean up.
    os._exit(130)


SIGINT_IGNORED = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
if not SIGINT_IGNORED:
    signal.signal(signal.SIGINT, _stopped_while_starting)
from shdcli.cli import main  # noqa: E402

if not SIGINT_IGNORED:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":
    main()
