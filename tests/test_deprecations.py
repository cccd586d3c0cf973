"""Old public names that moved keep working, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import warnings

import pytest

from pruning.io import check_output_dir
from pruning.outputs import check_output_folder


def test_check_output_dir_is_a_deprecated_alias_of_check_output_folder(tmp_path):
    with pytest.warns(DeprecationWarning, match="check_output_folder"):
        assert check_output_dir(tmp_path / "new") == check_output_folder(tmp_path / "new")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with warnings.catch_warnings(), pytest.raises(Exception, match="full"):
        warnings.simplefilter("ignore", DeprecationWarning)
        check_output_dir(tmp_path / "full")  # the same refusal as check_output_folder's
