"""docs/cp_patch.md lists the edits that turn run_origin_clm.py into run_magi_clm.py: applied in order to
run_origin_clm.py, they must give run_magi_clm.py exactly."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGENERATE = "regenerate the list in docs/cp_patch.md with: python scripts/cp_patch_guide.py"


def guide_edits():
    guide = (REPO / "docs" / "cp_patch.md").read_text()
    section = guide.split("<!-- cp-patch-guide:start -->")[1].split("<!-- cp-patch-guide:end -->")[0]
    blocks = re.findall(r"^\d+\. Find\n\n   ```python\n(.*?)   ```\n\n   and make it\n\n   ```python\n(.*?)   ```\n",
                        section, re.DOTALL | re.MULTILINE)
    # The code blocks are indented by 3 spaces inside the numbered list.
    return [[[line[3:] for line in block.splitlines()] for block in pair] for pair in blocks]


def test_the_listed_edits_turn_the_baseline_into_the_cp_script():
    lines = (REPO / "run_origin_clm.py").read_text().splitlines()
    for n, (find, replace) in enumerate(guide_edits(), 1):
        starts = [i for i in range(len(lines) - len(find) + 1) if lines[i:i + len(find)] == find]
        assert len(starts) == 1, f"edit {n}: the block to find occurs {len(starts)} times; {REGENERATE}"
        lines[starts[0]:starts[0] + len(find)] = replace
    assert lines == (REPO / "run_magi_clm.py").read_text().splitlines(), \
        f"the edits do not give run_magi_clm.py; {REGENERATE}"
