"""The memory backend's state file: a file that cannot be written is reported, not spammed."""

from __future__ import annotations

from pathlib import Path

from structlog.testing import capture_logs

from proxy.limits.backend import MemoryBackend


def test_a_state_file_that_cannot_be_written_is_logged_once_then_counted(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # the state file's parent is a file: every write fails
    backend = MemoryBackend(state_file=str(blocker / "limits.json"), key="k")
    with capture_logs() as logs:
        for _ in range(120):  # two minutes of the once-a-second flusher
            backend.acquire_now("user", 1, 10**6, 1, 10**6)
            backend.save()
    lines = [e for e in logs if e["event"] == "limits_state_not_saved"]
    assert len(lines) == 1 and "count" not in lines[0]
    assert backend.not_saved.pending == 119
    assert list(tmp_path.iterdir()) == [blocker]  # no temporary files left behind

    blocker.unlink()  # the disk is fixed: the next write succeeds and says how many failed
    with capture_logs() as logs:
        backend.acquire_now("user", 1, 10**6, 1, 10**6)
        backend.save()
    assert [(e["event"], e["count"]) for e in logs] == [("limits_state_not_saved", 119)]
    assert (tmp_path / "not-a-directory" / "limits.json").exists()


def test_a_write_that_fails_after_the_temporary_file_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    state = tmp_path / "limits.json"
    state.mkdir()  # os.replace onto a directory fails once the temporary file is written
    backend = MemoryBackend(state_file=str(state), key="k")
    with capture_logs() as logs:
        backend.acquire_now("user", 1, 10, 1, 10)
        backend.save()
    assert [e["event"] for e in logs] == ["limits_state_not_saved"]
    assert list(tmp_path.iterdir()) == [state]
