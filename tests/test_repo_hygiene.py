"""Repository hygiene: generated outputs (data, workdirs, exports) are git-ignored."""

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("path", ["data/x.tfrecord", "workdirs/run/x", "exports/tiny_slip/x"])
def test_generated_outputs_are_git_ignored(path):
    """Outputs the README's commands write must not show up as untracked files."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, capture_output=True
    )
    assert result.returncode == 0, f"{path} is not git-ignored; add its folder to .gitignore"
