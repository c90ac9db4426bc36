#!/usr/bin/env python
"""Write docs/cp_patch.md's list of the edits that turn run_origin_clm.py into run_magi_clm.py.

Each edit is a block to find in the file as it stands after the edits before it (unique there, with a line or
more of context when the changed lines alone are not) and the block to put in its place. The list goes between
the guide's markers; tests/test_cp_patch_guide.py applies it to run_origin_clm.py and checks that it gives
run_magi_clm.py. Rerun after changing either script:

    python scripts/cp_patch_guide.py
"""

import difflib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- cp-patch-guide:start -->", "<!-- cp-patch-guide:end -->"


def count(lines, block):
    return sum(lines[i:i + len(block)] == block for i in range(len(lines) - len(block) + 1))


def edits(origin, magi):
    """(find, replace) line lists, in order, each find unique in the file as the edits before it left it."""
    result = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, origin, magi, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        current = magi[:j1] + origin[i1:]  # the edits before this one are made
        before, after = magi[:j1], origin[i2:]
        # The fewest lines of context, above or below, that make the block unique; of two, the more telling.
        for k in range(0 if i2 > i1 else 1, len(current) + 1):
            candidates = []
            for above, below in ((before[len(before) - k:] if k else [], []), ([], after[:k])):
                find = above + origin[i1:i2] + below
                if len(above) + len(below) == k and find and count(current, find) == 1:
                    candidates.append((sum(c.isalnum() for c in "".join(above + below)), above, below))
            if candidates:
                _, above, below = max(candidates, key=lambda c: c[0])
                break
        result.append((above + origin[i1:i2] + below, above + magi[j1:j2] + below))
    return result


def render(edit_list):
    parts = []
    for n, (find, replace) in enumerate(edit_list, 1):
        parts.append(f"{n}. Find\n\n   ```python\n" + "".join(f"   {line}".rstrip() + "\n" for line in find)
                     + "   ```\n\n   and make it\n\n   ```python\n"
                     + "".join(f"   {line}".rstrip() + "\n" for line in replace) + "   ```\n")
    return "\n".join(parts)


def main():
    origin = (REPO / "run_origin_clm.py").read_text().splitlines()
    magi = (REPO / "run_magi_clm.py").read_text().splitlines()
    guide_path = REPO / "docs" / "cp_patch.md"
    head, rest = guide_path.read_text().split(START)
    _, tail = rest.split(END)
    guide_path.write_text(head + START + "\n\n" + render(edits(origin, magi)) + "\n" + END + tail)


if __name__ == "__main__":
    main()
