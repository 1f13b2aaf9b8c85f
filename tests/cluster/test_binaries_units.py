"""Finding the cluster binaries when ``build.sh --print-paths`` says no.

The script exits non-zero when a component's directory lacks its ``.complete`` marker. That
happens for a moment while a second build of the same version swaps its directory in (it
removes the finished one first), which once surfaced as "cluster binaries not built ()".

Aspects tested (a stand-in script, since the real one reads the real cache):
- a refusal that clears on a later attempt (the swap finished) is retried, not reported;
- a refusal that lasts although every binary exists names the directories without the marker;
- a script that fails before printing anything reports its exit code and stderr;
- binaries that really are absent are named.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.localcluster import binaries


def fake_script(tmp_path: Path, body: str, *, make: tuple[str, ...] = binaries.NAMES) -> Path:
    bin_dir = tmp_path / "bin" / "k8s-v0"
    bin_dir.mkdir(parents=True)
    for name in make:
        (bin_dir / name).write_text("")
    lines = "".join(f"echo {name}={bin_dir / name}\n" for name in binaries.NAMES)
    script = tmp_path / "build.sh"
    script.write_text(f"calls={tmp_path}/calls\necho x >> $calls\n{body.replace('PRINT', lines)}")
    return script


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBETUNE_CLUSTER_BIN", raising=False)
    monkeypatch.setattr(binaries, "_PRINT_RETRY_S", 0.01)


def test_a_refusal_that_clears_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = fake_script(tmp_path, 'PRINT\n[ "$(wc -l < $calls)" -ge 3 ]\n')
    monkeypatch.setattr(binaries, "build_script", lambda: script)
    paths = binaries.find()
    assert set(paths) == set(binaries.NAMES)
    assert len((tmp_path / "calls").read_text().splitlines()) == 3


def test_a_lasting_refusal_names_the_unmarked_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = fake_script(tmp_path, "PRINT\nexit 1\n")
    monkeypatch.setattr(binaries, "build_script", lambda: script)
    with pytest.raises(binaries.BinariesMissing, match=r"every binary exists.*k8s-v0 lack the \.complete"):
        binaries.find()
    assert len((tmp_path / "calls").read_text().splitlines()) == binaries._PRINT_ATTEMPTS


def test_a_script_failing_before_printing_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = fake_script(tmp_path, "echo 'cat: go.sum: No such file or directory' >&2\nexit 1\n")
    monkeypatch.setattr(binaries, "build_script", lambda: script)
    with pytest.raises(binaries.BinariesMissing, match=r"exited with 1 and printed no paths: cat: go.sum"):
        binaries.find()


def test_absent_binaries_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = fake_script(tmp_path, "PRINT\nexit 1\n", make=binaries.NAMES[:-1])
    monkeypatch.setattr(binaries, "build_script", lambda: script)
    with pytest.raises(binaries.BinariesMissing, match=r"not built \(helm\)"):
        binaries.find()
    assert len((tmp_path / "calls").read_text().splitlines()) == 1
