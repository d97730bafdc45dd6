"""Errors and reports about many bad files list the first ones by name, then how many more."""

from pathlib import Path

import pytest

from refvision.data.bad_samples import LISTED, check_files, describe
from refvision.utils.listing import first_and_more


def test_first_and_more_lists_the_first_items_then_counts_the_rest() -> None:
    assert first_and_more([], 2) == ""
    assert first_and_more(["a", "b"], 2) == "a, b"
    assert first_and_more(["a", "b", "c", "d"], 2) == "a, b, ... and 2 more"
    assert first_and_more(["a", "b", "c"], 1, "; ") == "a; ... and 2 more"


def test_a_report_of_skipped_samples_names_the_first_and_counts_the_others() -> None:
    skipped = [(f"img_{i:02d}.jpg", "truncated") for i in range(LISTED + 3)]
    text = describe(skipped)
    assert text.split("; ")[:LISTED] == [f"img_{i:02d}.jpg: truncated" for i in range(LISTED)]
    assert text.endswith("; ... and 3 more") and f"img_{LISTED:02d}" not in text


def test_one_error_names_the_first_missing_files_and_counts_the_others(tmp_path: Path) -> None:
    files = [tmp_path / f"missing_{i:02d}.png" for i in range(LISTED + 2)]

    def exists(path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")

    with pytest.raises(FileNotFoundError) as error:
        check_files(files, exists, "raise", "the test split", threads=2)
    message = str(error.value)
    assert message.startswith(f"{LISTED + 2} missing file(s) in the test split")
    assert all(str(path) in message for path in files[:LISTED]) and str(files[LISTED]) not in message
    assert message.endswith("; ... and 2 more")
