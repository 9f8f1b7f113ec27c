"""Configuration of the RQ-Transformer (:class:`RQTransformerConfig`) and the paper's model sizes."""

from __future__ import annotations

from dataclasses import dataclass

from rqvae.errors import UserError

COND_TYPES = ("uncond", "class", "text")
CODE_EMBS = ("codebook", "learned")  # a code's input: a Linear of its RQ-VAE vector | a learned embedding
GELUS = ("exact", "sigmoid")  # erf GELU | x * sigmoid(1.702 x) (the official code's gelu "v2")


@dataclass
class RQTransformerConfig:
    code_shape: tuple[int, int, int] = (8, 8, 4)  # (H, W, D)
    vocab_size: int = 256  # K, codebook size of the RQ-VAE (the largest one with codebook_sizes)
    embed_dim: int = 64  # n_z, width of the RQ-VAE code embeddings
    width: int = 256
    n_spatial_layers: int = 4
    n_depth_layers: int = 2
    n_heads: int = 8
    cond_type: str = "class"  # "uncond" | "class" | "text"
    num_classes: int = 10  # class models: number of classes
    text_vocab_size: int = 0  # text models: size of the text token vocabulary
    cond_len: int = 1  # number of condition tokens (1 for class / uncond; text length for text)
    cfg_dropout: float = 0.0  # training: probability of replacing the condition by the null one (CFG)
    dropout: float = 0.1  # residual dropout
    attn_dropout: float = 0.0
    class_names: tuple[str, ...] = ()  # class models: optional names of the classes 0..num_classes-1
    # Architecture variants that official checkpoints can have; the defaults are the paper's models.
    n_depth_heads: int | None = None  # heads of the depth transformer (None: n_heads)
    attn_bias: bool = True  # biases of the attention's query, key, value and output projections
    mlp_bias: bool = True  # biases of the MLP's two linear layers
    gelu: str = "exact"  # MLP activation, one of GELUS
    # the depth stack's own biases / activation (None: the same as the spatial stack's above)
    depth_attn_bias: bool | None = None
    depth_mlp_bias: bool | None = None
    depth_gelu: str | None = None
    cumsum_depth: bool = True  # depth input d: head_mlp(sum_{d' < d} e(S_d')), else head_mlp(e(S_{d-1}))
    per_depth_head: bool = False  # one output Linear per depth (LayerNorm shared) instead of one for all
    per_depth_codebooks: bool = False  # the RQ-VAE has one codebook per depth: codebook (D, K, n_z)
    input_emb: str = "codebook"  # spatial input: input_mlp(e(S_{t,d})) | tok_emb(S_{t,d}), summed over d
    depth_emb: str = "codebook"  # depth input d: head_mlp(...) as cumsum_depth says | tok_emb(S_{t,d-1})
    per_depth_tok_emb: bool = False  # learned embeddings: one table per depth (else one for all depths)
    # a codebook size K_d per depth (max = vocab_size; official vocab_size as a list); None: K for all.
    # Depth d's logits beyond K_d are masked; different sizes need per_depth_head (and per_depth_tok_emb)
    codebook_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.code_shape = tuple(int(s) for s in self.code_shape)  # type: ignore[assignment]
        self.class_names = tuple(str(n) for n in self.class_names)
        if len(self.code_shape) != 3 or min(self.code_shape) < 1:
            raise UserError(f"code_shape must be (H, W, D) with positive sizes, got {self.code_shape}")
        if self.cond_type not in COND_TYPES:
            raise UserError(f"cond_type must be one of {COND_TYPES}, got {self.cond_type!r}")
        if self.width % self.n_heads:
            raise UserError(f"width {self.width} is not divisible by n_heads {self.n_heads}")
        if self.n_depth_heads is not None and self.n_depth_heads < 1:
            raise UserError(f"n_depth_heads must be >= 1 (or None for n_heads), got {self.n_depth_heads}")
        if self.width % self.depth_heads:
            raise UserError(f"width {self.width} is not divisible by n_depth_heads {self.depth_heads}")
        for name in ("input_emb", "depth_emb"):
            if getattr(self, name) not in CODE_EMBS:
                raise UserError(f"{name} must be one of {CODE_EMBS}, got {getattr(self, name)!r}")
        if self.gelu not in GELUS or self.depth_gelu not in (*GELUS, None):
            raise UserError(f"gelu and depth_gelu must be one of {GELUS} (depth_gelu also None: as gelu), "
                            f"got {self.gelu!r}, {self.depth_gelu!r}")
        self._check_codebook_sizes()
        if self.cond_type == "class" and self.num_classes < 1:
            raise UserError("a class-conditional model needs num_classes >= 1")
        if self.cond_type == "text" and self.text_vocab_size < 1:
            raise UserError("a text-conditional model needs text_vocab_size >= 1")
        if self.cond_type != "text" and self.cond_len != 1:
            raise UserError(f"{self.cond_type} models have exactly one condition token, "
                            f"got cond_len {self.cond_len}")
        if self.cond_len < 1:
            raise UserError(f"cond_len must be >= 1, got {self.cond_len}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise UserError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.cond_type == "uncond" and self.cfg_dropout > 0:
            raise UserError("cfg_dropout needs a class or text condition; "
                            "unconditional models have none to drop")
        if self.class_names and self.cond_type != "class":
            raise UserError(f"class_names are for class-conditional models; this one is {self.cond_type!r}: "
                            "leave class_names empty")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise UserError(f"{len(self.class_names)} class names for {self.num_classes} classes: "
                            "give exactly num_classes names, or none")

    @property
    def num_positions(self) -> int:
        return self.code_shape[0] * self.code_shape[1]

    @property
    def depth_heads(self) -> int:
        """Heads of the depth transformer."""
        return self.n_heads if self.n_depth_heads is None else self.n_depth_heads

    def _check_codebook_sizes(self) -> None:
        if self.codebook_sizes is None:
            return
        sizes = self.codebook_sizes = tuple(int(k) for k in self.codebook_sizes)
        if len(sizes) != self.depth or min(sizes) < 1 or max(sizes) != self.vocab_size:
            raise UserError(f"codebook_sizes {list(sizes)} must give one size >= 1 per depth ({self.depth}) "
                            f"with the largest equal to vocab_size {self.vocab_size}")
        if len(set(sizes)) > 1 and not (self.per_depth_head and (self.per_depth_tok_emb
                                                                 or not self.learned_tok_emb)):
            raise UserError(f"codebook_sizes {list(sizes)} differ between depths, which needs one output "
                            "Linear per depth (per_depth_head) and, with learned code embeddings, one table "
                            "per depth (per_depth_tok_emb)")

    @property
    def depth_vocab(self) -> tuple[int, ...]:
        """The codebook size of each depth, (K_0, ..., K_{D-1})."""
        return self.codebook_sizes or (self.vocab_size,) * self.depth

    def block_options(self, stack: str) -> dict[str, bool | str]:
        """Biases and activation of the blocks of ``stack`` ("spatial" or "depth"): Block keyword args."""
        spatial = dict(attn_bias=self.attn_bias, mlp_bias=self.mlp_bias, gelu=self.gelu)
        if stack == "spatial":
            return spatial
        own = dict(attn_bias=self.depth_attn_bias, mlp_bias=self.depth_mlp_bias, gelu=self.depth_gelu)
        return {k: spatial[k] if v is None else v for k, v in own.items()}

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        """Shape of the frozen RQ-VAE codebook buffer: (K, n_z), or (D, K, n_z) with per-depth codebooks."""
        K, n_z = self.vocab_size, self.embed_dim
        return (self.depth, K, n_z) if self.per_depth_codebooks else (K, n_z)

    @property
    def learned_tok_emb(self) -> bool:
        """Whether the model has learned code embeddings (tok_emb) for its spatial or depth input."""
        return "learned" in (self.input_emb, self.depth_emb)

    @property
    def depth(self) -> int:
        return self.code_shape[2]

    @property
    def cond_vocab(self) -> int:
        """Real condition vocabulary (without the null token)."""
        return {"uncond": 1, "class": self.num_classes, "text": self.text_vocab_size}[self.cond_type]

    @property
    def has_null_cond(self) -> bool:
        return self.cfg_dropout > 0

    @property
    def null_id(self) -> int:
        """Token id of the null condition used by classifier-free guidance (an extra embedding row)."""
        if not self.has_null_cond:
            raise UserError("this model was trained without condition dropout, so classifier-free guidance "
                            "has no null condition: use --cfg-scale 1, or train with --cond-dropout 0.1 "
                            "(train-ar)")
        return self.cond_vocab


# The paper's models (sizes from the official configs; parameter counts in reference-facts.md),
# and small presets that train and sample on a CPU.
AR_PRESETS: dict[str, RQTransformerConfig] = {
    "imagenet-480m": RQTransformerConfig((8, 8, 4), 16384, 256, 1536, 12, 4, 24, "class", 1000),
    "imagenet-821m": RQTransformerConfig((8, 8, 4), 16384, 256, 1536, 24, 4, 24, "class", 1000),
    "imagenet-1.4b": RQTransformerConfig((8, 8, 4), 16384, 256, 1536, 42, 6, 24, "class", 1000),
    "imagenet-3.8b": RQTransformerConfig((8, 8, 4), 16384, 256, 2560, 42, 6, 40, "class", 1000),
    "cc3m-654m": RQTransformerConfig((8, 8, 4), 16384, 256, 1280, 26, 4, 20, "text", 0,
                                     text_vocab_size=16384, cond_len=32),
    "ffhq-355m": RQTransformerConfig((8, 8, 4), 2048, 256, 1024, 24, 4, 16, "uncond", 1),
    "lsun-church-370m": RQTransformerConfig((8, 8, 4), 16384, 256, 1024, 24, 4, 16, "uncond", 1),
    "lsun-catbedroom-612m": RQTransformerConfig((8, 8, 4), 16384, 256, 1280, 26, 4, 20, "uncond", 1),
    # CPU presets: Fashion-MNIST 32x32 -> 8x8x4 codes, K = 256, class-conditional with a null class.
    "fmnist-small": RQTransformerConfig((8, 8, 4), 256, 64, 256, 4, 2, 8, "class", 10, cfg_dropout=0.1),
    "tiny": RQTransformerConfig((4, 4, 2), 16, 8, 32, 2, 1, 4, "class", 10, dropout=0.0),
}
