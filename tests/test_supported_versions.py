"""The CP script runs on the stacks of magi_utils.SUPPORTED_STACKS and refuses others first, with how to install a
supported one. The versions tried are read from SUPPORTED_STACKS: the lowest of each stack, the first above it,
one below it, and each stack's transformers with the other's accelerate."""

import importlib.metadata
import re
import sys

import pytest
from packaging.specifiers import SpecifierSet

import magi_utils
import run_magi_clm
from run_guards import UserError


def bounds(requirement):
    """'transformers>=4.51.0,<4.52.0' -> ('4.51.0', '4.52.0', '4.50.0'): the lowest version taken, the first refused
    above, and one refused below."""
    specifiers = SpecifierSet(re.sub(r"^[a-z]+", "", requirement))
    lowest = next(s.version for s in specifiers if s.operator == ">=")
    above = next(s.version for s in specifiers if s.operator == "<")
    major, minor, _ = lowest.split(".")
    return lowest, above, f"{major}.{int(minor) - 1}.0"


STACKS = [(bounds(t), bounds(a)) for t, a, _ in magi_utils.SUPPORTED_STACKS]
TAKEN = [(t[0], a[0]) for t, a in STACKS]
REFUSED = [case for t, a in STACKS for case in [(t[1], a[0]), (t[2], a[0]), (t[0], a[1]), (t[0], a[2])]] + [
    (t[0], a[0]) for (t, _), (_, a) in zip(STACKS, reversed(STACKS))
]


def installed_versions(monkeypatch, transformers_version, accelerate_version):
    """Stand in for the installed versions where require_version reads them."""
    real_version = importlib.metadata.version
    fake = {"transformers": transformers_version, "accelerate": accelerate_version}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or real_version(name))


@pytest.mark.parametrize("transformers_version, accelerate_version", TAKEN)
def test_supported_versions_are_taken(monkeypatch, transformers_version, accelerate_version):
    installed_versions(monkeypatch, transformers_version, accelerate_version)
    magi_utils.check_supported_versions()


@pytest.mark.parametrize("transformers_version, accelerate_version", REFUSED)
def test_unsupported_version_is_refused_first(monkeypatch, tmp_path, transformers_version, accelerate_version):
    installed_versions(monkeypatch, transformers_version, accelerate_version)
    monkeypatch.setattr(sys, "argv", ["run_magi_clm.py", "--output_dir", str(tmp_path), "--use_cpu"])
    with pytest.raises(UserError) as error:
        run_magi_clm.main()
    message = str(error.value)
    assert message.startswith(f"transformers {transformers_version} with accelerate {accelerate_version} is not "
                              "supported: ")
    for stack in magi_utils.SUPPORTED_STACKS:  # each stack, with how to install it
        assert all(part in message for part in stack)


def test_running_without_torchrun_is_refused(monkeypatch, tmp_path):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["run_magi_clm.py", "--output_dir", str(tmp_path), "--use_cpu"])
    with pytest.raises(UserError) as error:
        run_magi_clm.main()
    assert str(error.value) == "run_magi_clm.py runs under torchrun, even for one process: use run_magi_clm.sh."
