"""The bad input files, and the files rewritten already, that every answer rewrite of bench/ (reverse_digits,
worked_steps) must refuse the same way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from apt_model.data import generate, write_dataset

# (file content or None for no file, what the one-line error names)
BAD_FILES = [
    (None, "no such file"),
    ("{not json", "hc.json"),
    ('{"data": {"arithmetic": [{"input": "1 + 1 = ?", "output": "2"}]}}', "not generated HLBD Hardcore data"),
]


def assert_refuses_bad_file(
    main: Callable[[list[str]], int],
    content: str | None,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``main(src, dst)`` on a bad ``src`` exits 2 with ``message`` on one line, no traceback, and no ``dst``."""
    src, dst = tmp_path / "hc.json", tmp_path / "out.json"
    if content is not None:
        src.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main([str(src), str(dst)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not dst.exists()


def assert_refuses_rewritten_file(
    rewrite_first: Callable[[list[str]], int],
    main: Callable[[list[str]], int],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``main(done, done)`` on ``rewrite_first``'s copy of a generated file exits 2 with ``message`` and leaves the
    copy byte for byte as it was."""
    src, done = tmp_path / "hc.json", tmp_path / "done.json"
    write_dataset(generate("hardcore", size="small"), src)
    assert rewrite_first([str(src), str(done)]) == 0
    written = done.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main([str(done), str(done)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert done.read_bytes() == written
