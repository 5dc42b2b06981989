"""An audit of the files every ServerApp process of ``tests/test_flower.py`` opens.

Python imports ``sitecustomize`` at start-up from its path, and the test federation's
processes have this directory on ``PYTHONPATH``. In a ``flwr-serverapp`` process (the
ServerApps the SuperLink starts) with ``FEDBITS_TEST_OPENS`` set, an audit hook on
``open`` appends every path under ``FEDBITS_TEST_WATCH`` to that file, after a
``PID started`` line that shows the hook was there. The file is opened once, before
the hook is added, so recording never opens anything itself.
"""

import os
import sys

_LOG = os.environ.get("FEDBITS_TEST_OPENS")
_WATCH = os.environ.get("FEDBITS_TEST_WATCH")

if _LOG and _WATCH and os.path.basename(sys.argv[0]) == "flwr-serverapp":
    _FD = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(_FD, f"{os.getpid()} started\n".encode())

    def _record(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            if path.startswith(_WATCH):
                os.write(_FD, f"{os.getpid()} {path}\n".encode())

    sys.addaudithook(_record)
