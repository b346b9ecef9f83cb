import json

import numpy as np
import pytest

from compress.data import (
    DataError,
    calibration_samples,
    evaluation_windows,
    load_documents,
    pydoc_splits,
    token_stream,
)


def test_builtin_splits_are_disjoint_whole_documents():
    splits = pydoc_splits()
    seen = [set(splits[name]) for name in ("train", "calib", "eval")]
    assert all(seen) and not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert load_documents("builtin:pydoc-eval") == splits["eval"]
    assert load_documents("builtin:pydoc-calib") == splits["calib"]


def test_user_text_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n")
    assert load_documents(str(txt)) == ["first doc\nline two", "second doc"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_documents(str(jsonl)) == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"\n\n", "holds no text"),
        ("latin.txt", "caf\xe9".encode("latin-1"), "is not UTF-8 text"),
        ("bad.jsonl", b'{"text": "ok"}\n{"body": 1}\n', "bad.jsonl:2: each line must be a JSON object with a 'text' field"),
    ],
)
def test_bad_user_files_give_one_sentence(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_documents(str(path))


def test_unknown_builtin_and_missing_file():
    with pytest.raises(DataError, match="unknown built-in data set"):
        load_documents("builtin:wikitext")
    with pytest.raises(DataError, match="does not exist"):
        load_documents("/no/such/file.txt")


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_stream_joins_documents_with_eos_and_windows_are_the_first_non_overlapping_ones():
    stream = token_stream(["ab", "cde"], CharTokenizer())
    assert stream.tolist() == [97, 98, 0, 99, 100, 101]
    np.testing.assert_array_equal(evaluation_windows(stream, 2, 3), [[97, 98], [0, 99], [100, 101]])
    with pytest.raises(DataError, match="fewer than the 4 asked for"):
        evaluation_windows(stream, 2, 4, "x")


def test_calibration_is_seeded():
    stream = np.arange(1000)
    a, b = calibration_samples(stream, 16, 8, seed=3), calibration_samples(stream, 16, 8, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, calibration_samples(stream, 16, 8, seed=4))
    assert np.all(np.diff(a, axis=1) == 1)  # each sample is a contiguous run of the stream
    with pytest.raises(DataError, match="shorter than one window"):
        calibration_samples(stream[:10], 16, 1, seed=0)
