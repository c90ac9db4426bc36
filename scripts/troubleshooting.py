#!/usr/bin/env python
"""Write docs/troubleshooting.md from the bad inputs that the tests check (tests/bad_inputs.py): for each, what was
done, what the run says, and the fix. tests/test_troubleshooting.py checks that the file is up to date. Rerun after
changing the table:

    python scripts/troubleshooting.py
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from bad_inputs import (  # noqa: E402
    BAD_INPUTS,
    CP_BAD_INPUTS,
    FSDP_BAD_INPUTS,
    FSDP_RESUME_BAD_INPUTS,
    LAUNCHER_BAD_SETTINGS,
)

DOC = REPO / "docs" / "troubleshooting.md"
# What the tests' placeholders stand for, in the text.
PLACEHOLDERS = {"tmp": "DIR", "cwd": "$PWD", "host": "HOST", "pid": "PID", "accelerate": "VERSION"}

INTRO = """# When something is wrong

Both scripts check their arguments, data files, output folder and the checkpoint to resume from before any work,
and stop at the first problem with one line that names it and, after the last colon, the fix (exit code 2):

    run_magi_clm.py: error: Data file DIR/utf16.txt is not UTF-8 text (invalid start byte): convert it to UTF-8 ...

Through the launchers (or `python scripts/torchrun.py`, which is `torchrun` for them) a job prints that line once,
without tracebacks. A full disk or a folder that cannot be written while the run saves is said the same way, with
the checkpoint it was writing and the last complete one. Anything else ends with the traceback of the rank that
failed and torchrun's report.

This file is written by `python scripts/troubleshooting.py` from the cases that `tests/test_bad_inputs.py`,
`tests/test_fsdp.py` and `tests/test_launchers.py` check; DIR stands for a folder of yours.
"""


def cell(text):
    return text.replace("|", "\\|")


def table(rows, code):
    lines = ["| What was done | What the run says | The fix |", "| --- | --- | --- |"]
    for case, how, message in rows:
        problem, fix = message.format(**PLACEHOLDERS).rsplit(": ", 1)
        lines.append(f"| {cell(case)}: `{cell(code(how).format(**PLACEHOLDERS))}` | {cell(problem)} | {cell(fix)} |")
    return "\n".join(lines) + "\n"


def arguments(args, env):
    return " ".join([*(f"{name}={value}" for name, value in env.items()), *args])


def render():
    script_rows = [(case, (args, env), message) for case, args, env, message in BAD_INPUTS + CP_BAD_INPUTS]
    launcher_rows = [(case, (script, env), message) for case, script, env, message in LAUNCHER_BAD_SETTINGS]
    return "\n".join([
        INTRO,
        "## Arguments, data, output folder and checkpoint (both scripts; the last rows run_magi_clm.py only)\n",
        table(script_rows, lambda how: arguments(*how)),
        "## FSDP (the first rows run_magi_clm.py only)\n",
        table([(case, (args, env), message) for case, args, env, message in FSDP_BAD_INPUTS + FSDP_RESUME_BAD_INPUTS],
              lambda how: arguments(*how)),
        "## Launcher settings (refused before anything starts)\n",
        table(launcher_rows, lambda how: arguments(["bash", how[0]], how[1])),
    ])


def main():
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())


if __name__ == "__main__":
    main()
