"""docs/troubleshooting.md is what scripts/troubleshooting.py writes from the tests' table of bad inputs."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import troubleshooting  # noqa: E402


def test_the_troubleshooting_page_is_the_tests_table():
    assert troubleshooting.DOC.read_text() == troubleshooting.render(), \
        "docs/troubleshooting.md is out of date: regenerate it with python scripts/troubleshooting.py"
