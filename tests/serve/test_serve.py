"""``rqvae serve``'s HTTP API on tiny random-weight models: generation jobs and their progress, uploads and
the coarse-to-fine views, codes files `rqvae decode` reads, limits, bad input, concurrent requests."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # Starlette's TestClient runs on httpx
from starlette.testclient import TestClient  # noqa: E402

from rqvae.cli import main  # noqa: E402
from rqvae.data import FMNIST_CLASSES  # noqa: E402
from rqvae.errors import UserError  # noqa: E402
from rqvae.models.classifier import Classifier, ClassifierConfig  # noqa: E402
from rqvae.models.transformer import AR_PRESETS, RQTransformer  # noqa: E402
from rqvae.models.vae import RQVAE  # noqa: E402
from rqvae.serve.app import create_app  # noqa: E402
from rqvae.serve.engine import Engine  # noqa: E402
from rqvae.serve.models import find_model_dirs, load_models  # noqa: E402


def build_models(root: Path) -> Path:
    """A `make demo`-like folder: root/vae/model (RQ-VAE), root/ar/model (class RQ-Transformer with a null
    class, trained on "fmnist" per its train_config.json) and root/classifier, plus root/text (a text model)
    and root/uncond."""
    torch.manual_seed(0)
    vae = RQVAE.from_preset("tiny", image_size=16)  # K 64, n_z 16, depth 4; 4x4x4 codes <-> 16x16 RGB
    vae.save_pretrained(root / "demo" / "vae" / "model")
    cb = vae.quantizer.codebook[0]
    small = replace(AR_PRESETS["tiny"], code_shape=(4, 4, 4), vocab_size=64, embed_dim=16)
    RQTransformer(replace(small, cfg_dropout=0.1), codebook=cb).save_pretrained(root / "demo/ar/model")
    (root / "demo" / "ar" / "train_config.json").write_text(json.dumps({"data": "fmnist"}))
    Classifier(ClassifierConfig(in_channels=3, num_classes=10, width=4)).save_pretrained(
        root / "demo" / "classifier")  # the demo's classifier sits beside the models: not served, no error
    RQTransformer(replace(small, cond_type="uncond"), codebook=cb).save_pretrained(root / "uncond")

    from rqvae.data.text import save_tokenizer, train_tokenizer

    tok = train_tokenizer(["a red dress", "a blue shirt", "red shoes"] * 4, vocab_size=300, max_len=5)
    text = replace(small, cond_type="text", text_vocab_size=tok.get_vocab_size(), cond_len=5)
    RQTransformer(text, codebook=cb).save_pretrained(root / "text")
    save_tokenizer(tok, root / "text")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_models(tmp_path_factory.mktemp("serve"))


def make_client(paths, **kw) -> tuple[TestClient, Engine]:
    engine = Engine(load_models(paths, device="cpu"), max_images=kw.pop("max_images", 12),
                    batch_size=kw.pop("batch_size", 2))
    return TestClient(create_app(engine, **kw)), engine


@pytest.fixture(scope="module")
def client(root):
    c, engine = make_client([root / "demo"], max_upload_mb=0.05)
    yield c
    engine.close()


def wait(client: TestClient, job: str, timeout: float = 60.0) -> dict:
    import time

    end, seen = time.monotonic() + timeout, []
    while time.monotonic() < end:
        s = client.get(f"/api/jobs/{job}").json()
        seen.append(s["done"])
        if s["state"] != "running":
            s["seen"] = seen
            return s
        time.sleep(0.02)
    raise AssertionError(f"job {job} still running after {timeout} s")


def png(size=(40, 24), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def test_page_and_info(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in ("/static/app.js", "/static/app.css"):  # the page loads only what we serve
        assert f'"{src}"' in page.text and client.get(src).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text
    info = client.get("/api/info").json()
    assert info["vae"]["code_shape"] == [4, 4, 4] and info["vae"]["depth"] == 4
    assert info["ar"]["classes"] == list(FMNIST_CLASSES)  # train_config.json says data "fmnist"
    assert info["ar"]["has_null_cond"] is True and info["max_images"] == 12


def test_generate_progress_images_and_codes(client, tmp_path):
    r = client.post("/api/generate", json={"n": 5, "seed": 3, "class_id": 3, "top_k": 8, "top_p": 0.9,
                                           "cfg_scale": 1.5, "temperature": 0.9})
    assert r.status_code == 200, r.text
    s = wait(client, r.json()["job"])
    assert s["state"] == "done" and s["done"] == s["total"] == 5 and len(s["items"]) == 5
    assert set(s["seen"]) <= {0, 2, 4, 5}  # progress moves one batch (2 images) at a time
    first = s["items"][0]
    img = client.get(f"/api/items/{first}/image.png")
    assert img.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(img.content)).size == (16, 16)
    item = client.get(f"/api/items/{first}").json()
    assert "Dress" in item["label"] and item["depth"] == 4 and item["psnr"] is None
    assert len(item["codes"]) == 4 and len(item["codes"][0][0]) == 4

    data = client.get(f"/api/items/{first}/codes.safetensors").content
    (tmp_path / "c.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert f.get_tensor("codes").tolist() == [item["codes"]] and f.metadata()["format"] == "rqvae-codes/1"
    # `rqvae decode` reads the file and gives back the image the page shows (same decoder, same codes)
    vae_dir = Path(client.get("/api/info").json()["vae"]["path"])
    assert main(["decode", str(tmp_path / "c.safetensors"), "--model", str(vae_dir),
                 "-o", str(tmp_path / "dec")]) == 0
    decoded = next((tmp_path / "dec").rglob("*.png"))
    assert np.array_equal(np.asarray(Image.open(decoded)), np.asarray(Image.open(io.BytesIO(img.content))))

    again = wait(client, client.post("/api/generate", json={"n": 5, "seed": 3, "class_id": 3, "top_k": 8,
                                                            "top_p": 0.9, "cfg_scale": 1.5,
                                                            "temperature": 0.9}).json()["job"])
    assert client.get(f"/api/items/{again['items'][4]}").json()["codes"] == \
        client.get(f"/api/items/{s['items'][4]}").json()["codes"]  # same seed, same images


def test_depth_views_change_with_depth(client):
    s = wait(client, client.post("/api/generate", json={"n": 1, "seed": 0}).json()["job"])
    item = s["items"][0]
    images = [client.get(f"/api/items/{item}/image.png?depth={d}").content for d in range(1, 5)]
    heat = [client.get(f"/api/items/{item}/heat.png?depth={d}").content for d in range(1, 5)]
    assert len(set(images)) == 4 and len(set(heat)) == 4
    assert images[3] == client.get(f"/api/items/{item}/image.png").content  # default: all codes
    assert Image.open(io.BytesIO(heat[1])).mode == "RGB"
    for bad in ("0", "5", "x"):
        r = client.get(f"/api/items/{item}/image.png?depth={bad}")
        assert r.status_code == 400 and "depth must be 1..4" in r.json()["error"]
    assert client.get("/api/items/nope/image.png").status_code == 404


@pytest.mark.parametrize("mode,size,fmt", [("RGB", (40, 24), "PNG"), ("L", (9, 30), "JPEG"),
                                           ("RGBA", (16, 16), "PNG"), ("P", (64, 20), "GIF")])
def test_upload_any_mode_and_size(client, mode, size, fmt):
    r = client.post("/api/upload?name=x.img", content=png(size, mode, fmt))
    assert r.status_code == 200, r.text
    item = r.json()
    assert item["kind"] == "upload" and item["label"] == "x.img" and len(item["psnr"]) == 4
    orig = Image.open(io.BytesIO(client.get(f"/api/items/{item['id']}/original.png").content))
    assert orig.size == (16, 16) and orig.mode == "RGB"  # resized and centre-cropped as the model expects


def test_upload_psnr_matches_reconstruction(client):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    buf = io.BytesIO()
    Image.fromarray(((x[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(buf, format="PNG")
    item = client.post("/api/upload", content=buf.getvalue()).json()
    from rqvae.data.images import load_image

    ref = load_image(buf.getvalue(), 16, 3)
    vae = RQVAE.from_pretrained(Path(client.get("/api/info").json()["vae"]["path"]))
    with torch.no_grad():
        codes = vae.encode(ref[None])
        assert codes[0].tolist() == item["codes"]
        rec = vae.decode(codes, depth=2).clamp(-1, 1)
    want = 10 * torch.log10(4 / ((rec[0] - ref) ** 2).mean())
    assert item["psnr"][1] == pytest.approx(float(want), abs=0.01)


@pytest.mark.parametrize("data,message", [(b"", "empty file"), (b"not an image", "not a readable image"),
                                          (png()[:60], "not a readable image")])
def test_bad_uploads_get_a_message(client, data, message):
    r = client.post("/api/upload?name=broken.png", content=data)
    assert r.status_code == 400 and message in r.json()["error"]
    assert "broken.png" in r.json()["error"] or not data


def test_limits(client):
    r = client.post("/api/generate", json={"n": 10000})
    assert r.status_code == 400 and "--max-images" in r.json()["error"] and "10000" in r.json()["error"]
    big = b"\0" * (60 * 1024)  # over the fixture's 0.05 MB
    r = client.post("/api/upload", content=big)
    assert r.status_code == 413 and "0.05 MB" in r.json()["error"]
    r = client.post("/api/upload", content=iter([big[:30000], big[30000:]]))  # no Content-Length: streamed
    assert r.status_code == 413


@pytest.mark.parametrize("body,message", [
    ({"class_id": 10}, "out of range"), ({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top-p"),
    ({"n": "many"}, "n must be a int"), ({"colour": 1}, "unknown settings"), ([1, 2], "JSON object"),
    ({"n": 2.5}, "whole number"),
])
def test_bad_settings(client, body, message):
    r = client.post("/api/generate", json=body)
    assert r.status_code == 400 and message in r.json()["error"]


def test_concurrent_generations_both_finish(client):
    jobs, errors = {}, []

    def go(seed):
        try:
            r = client.post("/api/generate", json={"n": 4, "seed": seed})
            jobs[seed] = wait(client, r.json()["job"])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and all(jobs[s]["state"] == "done" and len(jobs[s]["items"]) == 4 for s in (1, 2))
    assert not set(jobs[1]["items"]) & set(jobs[2]["items"])


def test_text_uncond_and_vae_only(root):
    c, engine = make_client([root / "demo" / "vae" / "model", root / "text"])
    try:
        assert c.get("/api/info").json()["ar"]["cond_type"] == "text"
        assert "type a prompt" in c.post("/api/generate", json={"n": 1}).json()["error"]
        job = c.post("/api/generate", json={"n": 2, "prompt": "a red dress"}).json()["job"]
        assert wait(c, job)["state"] == "done"
        assert "null condition" in c.post("/api/generate", json={"cfg_scale": 2}).json()["error"]
    finally:
        engine.close()
    c, engine = make_client([root / "demo" / "vae", root / "uncond"])
    try:
        assert wait(c, c.post("/api/generate", json={"n": 1}).json()["job"])["state"] == "done"
    finally:
        engine.close()
    c, engine = make_client([root / "demo" / "vae"])
    try:
        assert c.get("/api/info").json()["ar"] is None
        assert "no RQ-Transformer" in c.post("/api/generate", json={"n": 1}).json()["error"]
        assert c.post("/api/upload", content=png()).status_code == 200
    finally:
        engine.close()


def test_model_folders_are_found(root, tmp_path):
    demo = root / "demo"
    want = (demo / "vae" / "model", demo / "ar" / "model")
    assert find_model_dirs([demo]) == want  # a `make demo` folder
    assert find_model_dirs([demo / "vae", demo / "ar"]) == want  # run folders holding model/
    assert find_model_dirs([demo / "ar" / "model", demo / "vae" / "model"]) == want
    for paths, message in [([tmp_path], "holds no model"), ([tmp_path / "x"], "does not exist"),
                           ([demo, root / "text"], "several rqtransformer"), ([root / "text"], "no RQ-VAE")]:
        with pytest.raises(UserError, match=message):
            find_model_dirs(paths)


def test_cli_errors(root, capsys):
    assert main(["serve", str(root / "demo"), "--port", "70000"]) == 2
    assert "--port must be" in capsys.readouterr().err
    assert main(["serve", str(root / "nothing"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_store_keeps_the_latest_items():
    from rqvae.serve.store import Bounded

    b = Bounded(2)
    b.add("a", 1)
    b.add("b", 2)
    assert b.get("a") == 1  # reading "a" makes "b" the oldest
    b.add("c", 3)
    assert (b.get("a"), b.get("b"), b.get("c")) == (1, None, 3)
