"""A GGUF file's extent is checked with the project's own table of ggml type sizes, not by importing gguf.

gguf's package imports numpy (~11 MB resident in a worker that never uses
it); the table is the same fact, held equal to gguf's here, and a type it
lacks is still looked up in gguf.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES

from tests.conftest_models import tiny_model_path  # noqa: F401 - fixture
from workers.contract import modelfile
from workers.contract.modelfile import GGML_TYPE_SIZES, ModelFileError, check_gguf_extent

ROOT = Path(__file__).resolve().parents[3]


def test_the_table_is_ggufs() -> None:
    assert GGML_TYPE_SIZES == {int(kind): tuple(sizes) for kind, sizes in GGML_QUANT_SIZES.items()}


def test_a_whole_file_passes_and_a_truncated_copy_is_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    check_gguf_extent(tiny_model_path)  # raises if not
    short = tmp_path / "short.gguf"
    short.write_bytes(tiny_model_path.read_bytes()[:-1])
    with pytest.raises(ModelFileError, match="tensor data needs .* bytes but the file has"):
        check_gguf_extent(short)


def test_a_type_missing_from_the_table_is_looked_up_in_gguf(tiny_model_path: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modelfile, "GGML_TYPE_SIZES", {})
    check_gguf_extent(tiny_model_path)
    short = tmp_path / "short.gguf"
    short.write_bytes(tiny_model_path.read_bytes()[:-1])
    with pytest.raises(ModelFileError, match="bytes but the file has"):
        check_gguf_extent(short)  # the sizes from gguf say the same as the table's


_CHECK = """
import json, sys
from pathlib import Path
from workers.contract.modelfile import check_gguf_extent
check_gguf_extent(Path(sys.argv[1]))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("numpy", "gguf"))))
"""


def test_checking_a_file_imports_neither_gguf_nor_numpy(tiny_model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny_model_path, copy)
    done = subprocess.run([sys.executable, "-c", _CHECK, str(copy)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
