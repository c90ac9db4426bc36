"""torchrun, as the launchers call it: `python scripts/torchrun.py ARGS` is `torchrun ARGS`, but for a job that a
rank ended on a bad input (exit code 2, after the script said why in one line: run_guards.run_main), which ends
with that code and without torchrun's report of a failed child (a traceback and a table of the ranks, some 40
lines under the one that matters). Any other failure gets torchrun's report, as it comes.
"""

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

USER_ERROR_EXIT = 2  # run_guards.USER_ERROR_EXIT: not imported, which would import transformers here


class HoldRecords(logging.Filter):
    """Holds back the log lines of the processes' end ("failed (exitcode: 2)", "Sending process ... SIGTERM") until
    it is known whether the job ended on a bad input."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        self.records.append(record)
        return False


def main():
    processes_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    held = HoldRecords()
    processes_log.addFilter(held)
    bad_input = False
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as error:
        bad_input = error.get_first_failure()[1].exitcode == USER_ERROR_EXIT
        if not bad_input:
            raise
    finally:
        processes_log.removeFilter(held)
        if not bad_input:
            for record in held.records:
                processes_log.handle(record)
    if bad_input:
        sys.exit(USER_ERROR_EXIT)


if __name__ == "__main__":
    main()
