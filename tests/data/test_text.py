import json

import pytest
import torch

from rqvae.data.text import (
    captions_for_files,
    encode_texts,
    load_tokenizer,
    pad_id,
    read_captions_jsonl,
    save_tokenizer,
    train_tokenizer,
)
from rqvae.errors import UserError

CAPTIONS = ["a red shirt", "a blue shoe", "the red bag is big", "a small blue bag"] * 4


def test_tokenizer_trains_pads_truncates_and_roundtrips(tmp_path):
    tok = train_tokenizer(CAPTIONS, vocab_size=300, max_len=6)
    ids = encode_texts(tok, ["a red shoe", "a red shirt and a blue shoe and the big bag"])
    assert ids.shape == (2, 6) and ids.dtype == torch.long
    p = pad_id(tok)
    assert (ids[0] == p).any() and not (ids[1] == p).any()  # short one padded, long one truncated
    assert tok.decode(ids[0].tolist()).strip() == "a red shoe"
    assert int(ids.max()) < tok.get_vocab_size()
    save_tokenizer(tok, tmp_path / "model")
    tok2 = load_tokenizer(tmp_path / "model")  # folder -> tokenizer.json, keeps max_len 6
    assert torch.equal(encode_texts(tok2, ["a red shoe", "A RED SHOE"]), ids[[0, 0]])


def test_captions_from_txt_files_and_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    imgs = [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    (tmp_path / "a.txt").write_text("first caption\n")
    (tmp_path / "sub" / "b.txt").write_text("second")
    assert captions_for_files(imgs) == ["first caption", "second"]

    jl = tmp_path / "caps.jsonl"
    jl.write_text(json.dumps({"file": "sub/b.png", "text": "from jsonl b"}) + "\n\n"
                  + json.dumps({"file": "a.png", "text": "from jsonl a"}) + "\n")
    assert captions_for_files(imgs, jl, root=tmp_path) == ["from jsonl a", "from jsonl b"]


def test_caption_errors_are_one_line(tmp_path):
    img = tmp_path / "x.png"
    with pytest.raises(UserError, match="1 of 1 images have no caption"):
        captions_for_files([img])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "x.png", "text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2 is not valid JSON") as e:
        read_captions_jsonl(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(UserError, match="no captions"):
        train_tokenizer([])
