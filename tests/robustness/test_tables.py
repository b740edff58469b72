"""Captions and tables (issue 7): each case asserts what happens to the row and what is reported.

Duplicated rows: KEPT (repeating a row is a legitimate way to up-weight it) and counted in
``stats["duplicate_rows"]``; ``dedupe=True`` drops exact (image, captions) repeats instead.
"""

from __future__ import annotations

import pytest
from PIL import Image

from clipforge.data.pairs import PairsDataset
from clipforge.errors import DataError


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    return tmp_path


def write(path, text: str | bytes):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_empty_captions_skipped_and_counted(root):
    t = write(root / "t.csv", 'image,caption\nimg/0.png,ok\nimg/1.png,\nimg/2.png,"   "\nimg/3.png,"\x00"\n')
    ds = PairsDataset(t)
    assert len(ds) == 1 and ds.all_captions == [["ok"]]
    assert ds.stats["empty_caption"] == 3 and ds.skipped["empty_caption"] == 3
    assert [w for r, w, _ in ds.issues if r == "empty_caption"] == [f"{t}:3", f"{t}:4", f"{t}:5"]


def test_non_utf8_bytes_replaced_and_counted(root):
    t = write(root / "t.csv", b"image,caption\nimg/0.png,caf\xe9 au lait\nimg/1.png,fine\n")
    ds = PairsDataset(t)
    assert ds.all_captions == [["caf\ufffd au lait"], ["fine"]]
    assert ds.stats["non_utf8"] == 1


def test_bom_header(root):
    t = write(root / "t.csv", "\ufeffimage,caption\nimg/0.png,x\n")
    assert PairsDataset(t).all_captions == [["x"]]


def test_nul_removed(root):
    t = write(root / "t.csv", "image,caption\nimg/0.png,a\x00b\nimg/1\x00.png,c\n")
    ds = PairsDataset(t)
    assert ds.all_captions == [["ab"], ["c"]]
    assert ds.image_paths[1].endswith("img/1.png")
    assert ds.stats["nul"] == 2  # lines that contained NUL


def test_long_text_truncated_eot_kept(root):
    from clipforge.tokenizer import Tokenizer

    tok = Tokenizer()
    long = "a very long caption " * 2000
    t = write(root / "t.csv", f"image,caption\nimg/0.png,{long}\n")
    _, tokens = PairsDataset(t, tokenizer=tok)[0]
    assert tokens.shape == (tok.context_length,)
    assert int(tokens[0]) == tok.sot_token_id and int(tokens[-1]) == tok.eot_token_id
    assert (tokens != 0).all()


def test_missing_column_names_it_and_lists_present(root):
    t = write(root / "t.csv", "image,caption\nimg/0.png,x\n")
    with pytest.raises(DataError) as info:
        PairsDataset(t, caption_key="text")
    msg = str(info.value)
    assert "'text'" in msg and "['image', 'caption']" in msg and "t.csv" in msg
    t2 = write(root / "u.csv", "picture,words\nimg/0.png,x\n")
    with pytest.raises(DataError, match=r"no image column.*\['picture', 'words'\]"):
        PairsDataset(t2)
    t3 = write(root / "v.jsonl", '{"image": "img/0.png", "caption": "x"}\n')
    with pytest.raises(DataError, match=r"'txt' not found.*\['image', 'caption'\]"):
        PairsDataset(t3, caption_key="txt")


def test_missing_table_names_path(root):
    with pytest.raises(DataError, match=r"pairs table not found: .*nope\.csv"):
        PairsDataset(root / "nope.csv")


def test_missing_image_file_names_path_and_row(root):
    t = write(root / "t.csv", "image,caption\nimg/0.png,a\nimg/404.png,b\n")
    ds = PairsDataset(t, on_bad="none")
    assert ds[1] is None
    (record,) = ds.skipped.examples()["missing"]
    assert f"{t}:3" in record and "img/404.png" in record


def test_duplicated_rows_kept_and_counted(root):
    text = "image,caption\nimg/0.png,a\nimg/0.png,a\nimg/0.png,b\nimg/0.png,a\n"
    t = write(root / "t.csv", text)
    ds = PairsDataset(t)
    assert len(ds) == 4 and ds.stats["duplicate_rows"] == 2
    deduped = PairsDataset(t, dedupe=True)
    assert deduped.all_captions == [["a"], ["b"]] and deduped.stats["duplicate_rows"] == 2


def test_paths_escaping_the_table_folder_refused_when_confined(root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    sub = root / "sub"
    sub.mkdir()
    rows = [
        "image,caption",
        "../img/0.png,parent",
        f"{outside},absolute",
        "x/../../img/1.png,sneaky",
        "/etc/passwd,system",
    ]
    t = write(sub / "t.csv", "\n".join(rows) + "\n")
    ds = PairsDataset(t, confine=True, strict=False)
    assert len(ds) == 0 and ds.stats["path_escape"] == 4
    assert ds.skipped["path_escape"] == 4
    assert {w for r, w, _ in ds.issues if r == "path_escape"} == {f"{t}:{n}" for n in range(2, 6)}


def test_root_override_resolves_relative_paths(root):
    sub = root / "tables"
    sub.mkdir()
    t = write(sub / "t.csv", "image,caption\nimg/2.png,x\n")
    ds = PairsDataset(t, data_root=root)
    assert ds.get_image(0).getpixel((0, 0)) == (100, 0, 0)


def test_row_with_extra_fields_is_skipped(root):
    t = write(root / "t.csv", "image,caption\nimg/0.png,a,EXTRA\nimg/1.png,b\n")
    ds = PairsDataset(t)
    assert ds.all_captions == [["b"]] and ds.stats["malformed_row"] == 1


def test_multiline_quoted_caption_line_numbers(root):
    t = write(root / "t.csv", 'image,caption\nimg/0.png,"two\nlines"\nimg/1.png,\n')
    ds = PairsDataset(t)
    assert ds.all_captions == [["two\nlines"]]
    assert ds.issues[0][:2] == ("empty_caption", f"{t}:4")


def test_jsonl_non_object_line(root):
    t = write(root / "t.jsonl", '{"image": "img/0.png", "caption": "x"}\n["a", "b"]\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: expected a JSON object"):
        PairsDataset(t)
    assert len(PairsDataset(t, strict=False)) == 1


def test_unknown_table_extension(root):
    t = write(root / "t.xlsx", "whatever")
    with pytest.raises(DataError, match="unknown table format"):
        PairsDataset(t)
