"""Official RQ-Transformer architecture options that the fixtures do not cover, checked against a direct
computation written here from the meaning of each option (kakaobrain/rq-vae-transformer): an official-layout
state dict is built by hand, converted, and our forward must equal the official maths on those tensors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from rqvae.cli import main
from rqvae.errors import UserError
from rqvae.models.transformer import RQTransformer
from rqvae.models.vae import RQVAE
from rqvae.official.convert import convert_official
from rqvae.official.load import load_official
from rqvae.official.transformer import convert_official_rqtransformer, load_codebook
from tests.helpers.paths import OFFICIAL

B, (H, W, D), K, NZ, C, L = 2, (3, 3, 3), 12, 6, 16, 1

# (name, options): every non-default official option in one of them
OPTIONS = {
    "all-off": dict(body_heads=4, head_heads=2, bias=False, gelu="v2", cumsum=False, shared_cls=False,
                    shared_codebook=False),
    "mixed": dict(body_heads=2, head_heads=4, bias=True, gelu="v2", cumsum=True, shared_cls=True,
                  shared_codebook=True, scaled_head_emb_vqvae=True, use_padding_emb=True),
    "exact-per-depth-cls": dict(body_heads=4, head_heads=4, bias=True, gelu="v1", cumsum=True,
                                shared_cls=False, shared_codebook=True),
    # learned code embeddings (tok_emb) instead of the RQ-VAE codebook, on one side or both
    "learned-per-depth": dict(body_heads=4, head_heads=2, bias=True, gelu="v1", cumsum=True, shared_cls=True,
                              shared_codebook=True, input_vqvae=False, head_vqvae=False, shared_tok=False),
    "learned-input-shared": dict(body_heads=4, head_heads=4, bias=False, gelu="v2", cumsum=True,
                                 shared_cls=True, shared_codebook=False, input_vqvae=False, shared_tok=True),
    "learned-head-per-depth": dict(body_heads=2, head_heads=2, bias=True, gelu="v1", cumsum=True,
                                   shared_cls=False, shared_codebook=True, head_vqvae=False,
                                   shared_tok=False),
    # the head (depth) stack with its own biases and GELU (the official code builds each stack from its block)
    "per-stack-blocks": dict(body_heads=4, head_heads=2, bias=True, gelu="v1", cumsum=True, shared_cls=True,
                             shared_codebook=True, head_attn_bias=False, head_gelu="v2"),
    "per-stack-mlp-bias": dict(body_heads=2, head_heads=2, bias=False, gelu="v2", cumsum=False,
                               shared_cls=False, shared_codebook=True, head_mlp_bias=True, head_gelu="v1"),
    # vocab_size as a list: a codebook size K_d per depth (max K), so per-depth heads / tok_emb tables
    "vocab-per-depth": dict(body_heads=4, head_heads=2, bias=True, gelu="v1", cumsum=True, shared_cls=False,
                            shared_codebook=False, vocab=[12, 7, 9]),
    "vocab-per-depth-learned": dict(body_heads=2, head_heads=4, bias=True, gelu="v2", cumsum=True,
                                    shared_cls=False, shared_codebook=True, input_vqvae=False,
                                    head_vqvae=False, shared_tok=False, vocab=[5, 12, 8]),
}


def sizes_of(o: dict) -> list[int]:
    return o.get("vocab", [K] * D)


def stack_options(o: dict, stack: str) -> dict:
    """attn_bias, mlp_bias, gelu of the official "body" or "head" stack."""
    opts = dict(attn_bias=o["bias"], mlp_bias=o["bias"], gelu=o["gelu"])
    if stack == "head":
        opts.update({k: o[f"head_{k}"] for k in opts if f"head_{k}" in o})
    return opts


def official_arch(o: dict) -> dict:
    def stack(n_layer, heads, name):
        return {"n_layer": n_layer, "block": {"embed_dim": C, "n_head": heads, **stack_options(o, name)}}
    return {"type": "rq-transformer", "vocab_size": o.get("vocab", K), "block_size": [H, W, D],
            "vocab_size_cond": 5, "block_size_cond": L, "embed_dim": C, "input_embed_dim": NZ,
            "input_emb_vqvae": o.get("input_vqvae", True), "head_emb_vqvae": o.get("head_vqvae", True),
            "cumsum_depth_ctx": o["cumsum"], "shared_tok_emb": o.get("shared_tok", False),
            "shared_cls_emb": o["shared_cls"], "body": stack(2, o["body_heads"], "body"),
            "head": stack(2, o["head_heads"], "head"),
            **{k: o[k] for k in ("scaled_head_emb_vqvae", "use_padding_emb") if k in o}}


def official_state(o: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    sd = {"pos_emb_cond": r(1, L, C), "pos_emb_hw": r(1, H * W, C), "pos_emb_d": r(1, D, C),
          "cond_emb.weight": r(5, C), "classifier.layer_norm.weight": 1 + r(C),
          "classifier.layer_norm.bias": r(C)}
    for side, mlp in (("input_vqvae", "input_mlp"), ("head_vqvae", "head_mlp")):
        if o.get(side, True):
            sd.update({f"{mlp}.weight": r(C, NZ), f"{mlp}.bias": r(C)})
    if not (o.get("input_vqvae", True) and o.get("head_vqvae", True)):  # nn.Embedding or TupleEmbedding
        sd["tok_emb.weight"] = r(K if o["shared_tok"] else sum(sizes_of(o)), C)
        if not o["shared_tok"]:
            sd["tok_emb.offsets"] = torch.tensor([0, *sizes_of(o)[:-1]]).cumsum(0)
    if o["shared_cls"]:
        sd.update({"classifier.linear.weight": r(K, C), "classifier.linear.bias": r(K)})
    else:  # BatchLinear: weight (D, in, out), bias (D, out)
        sd.update({"classifier.linear.weight": r(D, C, K), "classifier.linear.bias": r(D, K)})
    for stack in ("body_transformer", "head_transformer"):
        opts = stack_options(o, stack[:4])
        for i in range(2):
            p = f"{stack}.blocks.{i}."
            shapes = {"attn.query": (C, C), "attn.key": (C, C), "attn.value": (C, C), "attn.proj": (C, C),
                      "mlp.0": (4 * C, C), "mlp.2": (C, 4 * C)}
            for name, shape in shapes.items():
                sd[p + name + ".weight"] = r(*shape)
                if opts["attn_bias" if name.startswith("attn") else "mlp_bias"]:
                    sd[p + name + ".bias"] = r(shape[0])
            for ln in ("ln1", "ln2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(C), r(C)
    return sd


def linear(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def block(x, sd, p, heads, gelu):
    """Pre-LN GPT block with explicit causal softmax attention; gelu v1 = erf GELU, v2 = x*sigmoid(1.702x)."""
    n, T, _ = x.shape
    h = F.layer_norm(x, (C,), sd[p + "ln1.weight"], sd[p + "ln1.bias"])
    q, k, v = (linear(h, sd, p + f"attn.{m}").view(n, T, heads, -1).transpose(1, 2)
               for m in ("query", "key", "value"))
    att = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    x = x + linear((att @ v).transpose(1, 2).reshape(n, T, C), sd, p + "attn.proj")
    m = linear(F.layer_norm(x, (C,), sd[p + "ln2.weight"], sd[p + "ln2.bias"]), sd, p + "mlp.0")
    m = F.gelu(m) if gelu == "v1" else m * torch.sigmoid(1.702 * m)
    return x + linear(m, sd, p + "mlp.2")


def tok_emb(o, sd, xs):
    """The official tok_emb: one table (nn.Embedding) or a TupleEmbedding (index + offset of the depth)."""
    return sd["tok_emb.weight"][xs if o["shared_tok"] else xs + sd["tok_emb.offsets"]]


def official_logits(o, sd, books, codes, cond):
    """books (D, K, n_z): depth d's codes embed with books[d] (all equal for a shared codebook)."""
    xs = codes.view(B, H * W, D)
    emb = None  # (B, T, D, n_z); no codebook for learned embeddings on both sides
    if books is not None:
        emb = torch.stack([books[d][xs[..., d]] for d in range(D)], dim=2)
    x_in = linear(emb, sd, "input_mlp") if o.get("input_vqvae", True) else tok_emb(o, sd, xs)
    x = torch.cat([sd["cond_emb.weight"][cond][:, None] + sd["pos_emb_cond"],
                   (x_in.sum(2) + sd["pos_emb_hw"])[:, :-1]], dim=1)
    for i in range(2):
        x = block(x, sd, f"body_transformer.blocks.{i}.", o["body_heads"], o["gelu"])
    if o.get("head_vqvae", True):
        ctx = linear(emb.cumsum(2) if o["cumsum"] else emb, sd, "head_mlp")  # (B, T, D, C)
    else:
        ctx = tok_emb(o, sd, xs)  # no cumulative sum over learned embeddings
    v = (torch.cat([x[:, L - 1:, None], ctx[:, :, :-1]], dim=2) + sd["pos_emb_d"]).view(B * H * W, D, C)
    for i in range(2):
        v = block(v, sd, f"head_transformer.blocks.{i}.", o["head_heads"], stack_options(o, "head")["gelu"])
    v = F.layer_norm(v, (C,), sd["classifier.layer_norm.weight"], sd["classifier.layer_norm.bias"])
    if o["shared_cls"]:
        return linear(v, sd, "classifier.linear").view(B, H * W, D, K)
    out = torch.einsum("bij,ijk->bik", v, sd["classifier.linear.weight"]) + sd["classifier.linear.bias"]
    return out.view(B, H * W, D, K)


@pytest.mark.parametrize("name", OPTIONS)
def test_converted_forward_equals_the_official_computation(name):
    o = OPTIONS[name]
    g = torch.Generator().manual_seed(3)
    sd = official_state(o, g)
    books = torch.randn(D, K + 1, NZ, generator=g)  # official layout: K codes + 1 padding row per depth
    if o["shared_codebook"]:
        books[:] = books[0].clone()
    uses_books = o.get("input_vqvae", True) or o.get("head_vqvae", True)
    model = convert_official_rqtransformer(sd, official_arch(o), books if uses_books else None)
    assert model.config.per_depth_codebooks == (uses_books and not o["shared_codebook"])
    sizes = torch.tensor(sizes_of(o))
    codes = (torch.rand(B, H, W, D, generator=g) * sizes).long()  # depth d: codes in [0, K_d)
    cond = torch.tensor([1, 4])
    with torch.no_grad():
        got = model(codes, cond)
        want = official_logits(o, sd, books[:, :K], codes, cond)
    valid = torch.arange(K) < sizes[:, None]  # (D, K): depth d has K_d codes, its other logits masked
    torch.testing.assert_close(got[..., valid], want[..., valid], atol=1e-5, rtol=1e-5)
    assert (got[..., ~valid] == torch.finfo(got.dtype).min).all()
    ref, fast = (model.generate(cond, top_k=3, temperature=3.0, generator=torch.Generator().manual_seed(0),
                                dtype=torch.float32, impl=impl) for impl in ("reference", "fast"))
    assert torch.equal(ref, fast) and (ref < sizes).all()


def test_rqvae_with_a_codebook_per_depth_converts_both_stages(tmp_path):
    """An official RQ-VAE with shared_codebook: false -> per-depth codebooks, and the stage-2 model on it."""
    vae = tmp_path / "vae"
    shutil.copytree(OFFICIAL / "rqvae_tiny", vae)
    ckpt = torch.load(vae / "model.pt", weights_only=True)
    for d in range(1, 4):  # every depth its own (K + 1, n_z) tensors
        for k in ("weight", "embed_ema", "cluster_size_ema"):
            name = f"quantizer.codebooks.{d}.{k}"
            ckpt["state_dict"][name] = ckpt["state_dict"][name] * (1 + d / 10)
    torch.save(ckpt, vae / "model.pt")
    cfg = yaml.safe_load((vae / "config.yaml").read_text())
    cfg["arch"]["hparams"]["shared_codebook"] = False
    (vae / "config.yaml").write_text(yaml.safe_dump(cfg))
    books = load_codebook(vae)
    assert books.shape == (4, 64, 16) and not torch.equal(books[0], books[1])
    convert_official(OFFICIAL / "rqtransformer_class_tiny", tmp_path / "ar", vae_dir=vae)
    model = RQTransformer.from_pretrained(tmp_path / "ar").eval()
    assert model.config.per_depth_codebooks and torch.equal(model.codebook, books)
    state, arch = load_official(OFFICIAL / "rqtransformer_class_tiny")
    shared = convert_official_rqtransformer(state, arch, books[0])
    codes = torch.randint(0, 64, (1, 8, 8, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(codes, torch.tensor([2])), shared(codes, torch.tensor([2]))
    # position 0: depths 0 and 1 see the condition and book 0 only (the same in both models); depth d >= 2
    # sees books 1..d-1, which differ
    torch.testing.assert_close(a[:, 0, :2], b[:, 0, :2])
    assert (a[:, 0, 2:] - b[:, 0, 2:]).abs().amax(-1).gt(1e-4).all()


def test_learned_embeddings_convert_without_an_rqvae(tmp_path):
    """input_emb_vqvae and head_emb_vqvae false: the official model never reads a codebook, so no --vae."""
    o = OPTIONS["learned-per-depth"]
    src = tmp_path / "official"
    src.mkdir()
    sd = official_state(o, torch.Generator().manual_seed(5))
    torch.save({"epoch": 0, "state_dict": sd}, src / "model.pt")
    (src / "config.yaml").write_text(yaml.safe_dump({"arch": official_arch(o)}))
    convert_official(src, tmp_path / "ar")
    model = RQTransformer.from_pretrained(tmp_path / "ar").eval()
    assert (model.config.input_emb, model.config.depth_emb, model.config.per_depth_tok_emb) == (
        "learned", "learned", True)
    codes = torch.randint(0, K, (B, H, W, D), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = official_logits(o, sd, None, codes, torch.tensor([0, 3]))
        torch.testing.assert_close(model(codes, torch.tensor([0, 3])), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("edit,message", [
    (dict(shared_cls_emb=True), "differs between depths with shared_cls_emb true; the official code cannot"),
    (dict(input_emb_vqvae=False, shared_tok_emb=True), "with shared_tok_emb true; the official code cannot"),
    (dict(vocab_size=[12, 7]), "2 sizes for 3 code depths; the official code cannot build it either"),
])
def test_per_depth_vocab_sizes_the_official_code_cannot_build_are_refused(edit, message):
    o = OPTIONS["vocab-per-depth"]
    sd = official_state(o, torch.Generator().manual_seed(1))
    with pytest.raises(UserError, match=message):
        convert_official_rqtransformer(sd, {**official_arch(o), **edit}, torch.randn(D, K + 1, NZ))


def per_depth_vae(vae: Path, sizes: list[int]) -> dict[str, torch.Tensor]:
    """The tiny official RQ-VAE in ``vae`` with len(sizes) depths, depth d with its own K_d codes
    (hparams.n_embed a list, shared_codebook false); returns its state dict."""
    shutil.copytree(OFFICIAL / "rqvae_tiny", vae)
    ckpt = torch.load(vae / "model.pt", weights_only=True)
    sd = ckpt["state_dict"]
    g = torch.Generator().manual_seed(4)
    for d in range(len(sizes), 4):  # fewer depths: no codebook for the others
        for name in ("weight", "embed_ema", "cluster_size_ema"):
            del sd[f"quantizer.codebooks.{d}.{name}"]
    for d, k in enumerate(sizes):  # depth d: K_d codes + the official padding row
        w = sd[f"quantizer.codebooks.{d}.weight"] * (1 + d / 10)
        sd[f"quantizer.codebooks.{d}.weight"] = torch.cat([w[torch.randperm(64, generator=g)[:k]], w[-1:]])
        sd[f"quantizer.codebooks.{d}.embed_ema"] = sd[f"quantizer.codebooks.{d}.embed_ema"][:k].clone()
        sd[f"quantizer.codebooks.{d}.cluster_size_ema"] = sd[f"quantizer.codebooks.{d}.cluster_size_ema"][:k]
    torch.save(ckpt, vae / "model.pt")
    cfg = yaml.safe_load((vae / "config.yaml").read_text())
    cfg["arch"]["hparams"].update(shared_codebook=False, n_embed=sizes)
    cfg["arch"]["hparams"]["code_shape"][-1] = len(sizes)
    (vae / "config.yaml").write_text(yaml.safe_dump(cfg))
    return sd


def test_rqvae_with_per_depth_codebook_sizes_converts_both_stages(tmp_path):
    """hparams.n_embed [64, 40, 64, 24] without a shared codebook: depth d quantizes with its K_d rows only
    (greedy residual quantization written out here), and the codebook a stage-2 model embeds with."""
    sizes = [64, 40, 64, 24]
    vae = tmp_path / "vae"
    sd = per_depth_vae(vae, sizes)
    convert_official(vae, tmp_path / "vae_ours")
    model = RQVAE.from_pretrained(tmp_path / "vae_ours").eval()
    assert model.config.codebook_sizes == tuple(sizes)
    latent = load_file(OFFICIAL / "rqvae_tiny" / "io.safetensors")["latent"].reshape(-1, 16)  # (N, n_z)
    books = [sd[f"quantizer.codebooks.{d}.weight"][:k] for d, k in enumerate(sizes)]
    r, want = latent.clone(), []
    for book in books:  # greedy RQ, each depth over its own K_d codes
        k = torch.cdist(r, book).argmin(1)
        want.append(k)
        r = r - book[k]
    want = torch.stack(want, 1)
    assert torch.equal(model.quantizer.encode(latent), want)
    assert want[:, 3].max() < 24 and want[:, 1].max() < 40
    zhat = sum(book[want[:, d]] for d, book in enumerate(books))
    torch.testing.assert_close(model.quantizer.decode(want), zhat)
    with pytest.raises(UserError, match="depth i must lie in"):
        model.quantizer.decode(torch.full((1, 4), 30))

    # stage 2 embeds depth d's codes with book d: its K_d rows, padded to 64 with rows never indexed
    padded = load_codebook(tmp_path / "vae_ours")
    assert padded.shape == (4, 64, 16)
    for d, book in enumerate(books):
        assert torch.equal(padded[d, :sizes[d]], book) and not padded[d, sizes[d]:].any()


def test_vae_codebook_sizes_must_match_per_depth(tmp_path, capsys):
    """--vae: each depth's codebook size of the RQ-VAE must equal the RQ-Transformer's (the same largest size
    is not enough); a mismatch is one line naming both lists."""
    o = OPTIONS["vocab-per-depth-learned"]  # vocab_size [5, 12, 8], learned embeddings
    src = tmp_path / "official"
    src.mkdir()
    torch.save({"state_dict": official_state(o, torch.Generator().manual_seed(7))}, src / "model.pt")
    (src / "config.yaml").write_text(yaml.safe_dump({"arch": official_arch(o)}))
    per_depth_vae(tmp_path / "vae_match", [5, 12, 8])
    convert_official(src, tmp_path / "ar", vae_dir=tmp_path / "vae_match")
    assert RQTransformer.from_pretrained(tmp_path / "ar").config.codebook_sizes == (5, 12, 8)

    per_depth_vae(tmp_path / "vae_swapped", [5, 8, 12])
    assert main(["convert-official", str(src), str(tmp_path / "ar2"), "--vae", str(tmp_path / "vae_swapped")
                 ]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "codebook sizes per depth [5, 8, 12] differ from the RQ-Transformer's vocab_size [5, 12, 8]" in err
    ragged = tmp_path / "vae_ragged"
    per_depth_vae(ragged, [64, 40, 64, 24])  # and a stage-2 model with one size 64 for all depths
    message = r"\[64, 40, 64, 24\] differ from the RQ-Transformer's vocab_size \[64, 64, 64, 64\]"
    with pytest.raises(UserError, match=message):
        convert_official(OFFICIAL / "rqtransformer_class_tiny", tmp_path / "ar3", vae_dir=ragged)
    assert not (tmp_path / "ar2").exists() and not (tmp_path / "ar3").exists()
