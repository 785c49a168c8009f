"""benchmarks.common.git_revision: a result names the commit its code came from, marked when the tracked files
differ from it (untracked files do not count), and nothing outside a repository."""
import subprocess

from benchmarks.common import git_revision


def _git(root, *args):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_revision_marks_uncommitted_changes(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert git_revision(str(tmp_path)) == {"git": head}
    (tmp_path / "new.py").write_text("untracked\n")
    assert git_revision(str(tmp_path)) == {"git": head}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_revision(str(tmp_path)) == {"git": head + "+uncommitted"}


def test_git_revision_outside_a_repository(tmp_path):
    assert git_revision(str(tmp_path / "missing")) == {}
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_revision(str(plain)) == {}
