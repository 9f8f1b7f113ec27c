"""The model side of ``rqvae serve``: generation requests (checked, then run in small batches by a worker
thread), uploads encoded into codes, and the depth views of any image. Nothing here touches HTTP."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from rqvae.data.common import reason
from rqvae.data.images import load_image
from rqvae.data.text import encode_texts
from rqvae.errors import UserError
from rqvae.models.hub import weights_sha256
from rqvae.serve.models import Models
from rqvae.serve.store import Item, Job, Store
from rqvae.serve.views import Views, codes_file, make_views


@dataclass
class GenerateRequest:
    """One generation request from the page (JSON body of POST /api/generate)."""

    n: int = 8
    seed: int = 0
    class_id: int | None = None  # class models: None cycles over all classes
    prompt: str = ""  # text models
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    cfg_scale: float = 1.0  # 1 = off

    @classmethod
    def from_json(cls, data: Any) -> GenerateRequest:
        if not isinstance(data, dict):
            raise UserError("the request body must be a JSON object of generation settings")
        kinds = {"n": int, "seed": int, "class_id": int, "prompt": str, "temperature": float, "top_k": int,
                 "top_p": float, "cfg_scale": float}
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise UserError(f"unknown settings {unknown}; known: {sorted(kinds)}")
        values = {}
        for key, value in data.items():
            if value is None or value == "":
                continue
            try:
                values[key] = kinds[key](value)
            except (TypeError, ValueError):
                raise UserError(f"{key} must be a {kinds[key].__name__}, got {value!r}") from None
            if isinstance(value, float) and kinds[key] is int and value != int(value):
                raise UserError(f"{key} must be a whole number, got {value!r}")
        return cls(**values)


class Engine:
    """Models + store + a small pool of worker threads for generation jobs."""

    def __init__(self, models: Models, *, max_images: int = 64, batch_size: int = 8, workers: int = 2,
                 store: Store | None = None):
        self.models = models
        self.max_images, self.batch_size = max_images, batch_size
        self.store = store or Store()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rqvae-generate")
        self.closing = threading.Event()
        self._sha256: str | None = None

    def close(self) -> None:
        """Stop at the next batch boundary and let the worker threads finish."""
        self.closing.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------- generation
    def check(self, req: GenerateRequest) -> torch.Tensor | None:
        """UserError for settings the model cannot honour; else the conditions (n,) / (n, L) / None."""
        ar = self.models.ar
        if ar is None:
            raise UserError("no RQ-Transformer was loaded; start rqvae serve with one to generate images")
        if not 1 <= req.n <= self.max_images:
            raise UserError(f"asked for {req.n} images; this server makes 1..{self.max_images} per request "
                            "(start it with --max-images N for more)")
        if req.temperature <= 0 or req.top_k < 0 or not 0 < req.top_p <= 1 or req.cfg_scale < 0:
            raise UserError("temperature must be > 0, top-k >= 0 (0 = off), top-p in (0, 1] "
                            "and CFG scale >= 0")
        if req.cfg_scale != 1 and not ar.config.has_null_cond:
            raise UserError("this model has no null condition (trained without condition dropout): use CFG "
                            "scale 1, or train it with rqvae train-ar --cond-dropout 0.1")
        return self._conditions(req)

    def _conditions(self, req: GenerateRequest) -> torch.Tensor | None:
        c = self.models.ar.config
        if c.cond_type == "uncond":
            return None
        if c.cond_type == "class":
            if req.class_id is None:
                ids = torch.arange(c.num_classes)
                return ids.repeat(math.ceil(req.n / c.num_classes))[:req.n]
            if not 0 <= req.class_id < c.num_classes:
                raise UserError(f"class {req.class_id} is out of range; this model has classes "
                                f"0..{c.num_classes - 1}")
            return torch.full((req.n,), req.class_id, dtype=torch.long)
        if not req.prompt.strip():
            raise UserError("this model is text-conditional; type a prompt")
        ids = encode_texts(self.models.tokenizer, [req.prompt])  # (1, L)
        if int(ids.max()) >= c.text_vocab_size:
            raise UserError("the model's tokenizer.json gives ids beyond its text vocabulary; "
                            "use the tokenizer saved with the model")
        return ids.expand(req.n, -1)

    def submit(self, req: GenerateRequest) -> Job:
        """Check the request (UserError on bad settings) and start it in a worker thread."""
        cond = self.check(req)
        job = self.store.add_job(Job(total=req.n))
        self.pool.submit(self._run, job, req, cond)
        return job

    def _label(self, req: GenerateRequest, cond: torch.Tensor | None, i: int) -> str:
        kind = self.models.ar.config.cond_type
        what = {"uncond": "unconditional", "text": f"“{req.prompt}”"}.get(kind, "")
        if kind == "class":
            k = int(cond[i])
            name = self.models.class_names[k] if k < len(self.models.class_names) else str(k)
            what = f"class {k}" + (f" ({name})" if name != str(k) else "")
        return f"{what}, seed {req.seed}, #{i}"

    def _run(self, job: Job, req: GenerateRequest, cond: torch.Tensor | None) -> None:
        m = self.models
        try:
            g = torch.Generator(device=m.device).manual_seed(req.seed)
            for start in range(0, req.n, self.batch_size):
                if self.closing.is_set():
                    raise UserError("the server is shutting down")
                b = min(self.batch_size, req.n - start)
                c = None if cond is None else cond[start:start + b].to(m.device)
                codes = m.ar.generate(c, batch_size=b, temperature=req.temperature, top_k=req.top_k or None,
                                      top_p=None if req.top_p >= 1 else req.top_p, cfg_scale=req.cfg_scale,
                                      generator=g).cpu()  # (b, h, w, D)
                for i in range(b):
                    item = Item(codes[i:i + 1], self._label(req, cond, start + i), "generated")
                    job.item_ids.append(self.store.add_item(item).id)
                job.done = start + b
            job.state = "done"
        except UserError as e:
            job.state, job.error = "error", str(e)
        except Exception as e:  # keep the server up; the page shows the message
            job.state, job.error = "error", f"generation failed: {type(e).__name__}: {e}"

    # ------------------------------------------------------------------------------- uploads, views
    def encode_upload(self, data: bytes, name: str) -> Item:
        """Image file bytes (any mode, any size) -> an item with its codes; UserError if unreadable."""
        cfg = self.models.vae.config
        try:
            x = load_image(data, cfg.image_size, cfg.in_channels)  # (C, S, S), resized and centre-cropped
        except Exception as e:  # any decoder error
            raise UserError(f"{name or 'the file'} is not a readable image ({reason(e)}); "
                            "upload a PNG, JPEG, GIF, BMP, TIFF or WebP file") from None
        with torch.no_grad():
            codes = self.models.vae.encode(x[None].to(self.models.device)).cpu()  # (1, h, w, D)
        return self.store.add_item(Item(codes, name or "upload", "upload", original=x))

    def views(self, item: Item) -> Views:
        with item.lock:  # decode each item once, even when several requests ask at the same time
            if item.views is None:
                item.views = make_views(self.models.vae, item.codes, item.original)
            return item.views

    def codes_file(self, item: Item) -> bytes:
        m = self.models
        if self._sha256 is None:
            self._sha256 = weights_sha256(m.vae_dir)
        return codes_file(item.codes, m.vae.config, model_dir=m.vae_dir, sha256=self._sha256,
                          source=f"rqvae serve: {item.label}")

    def info(self) -> dict[str, Any]:
        """What the page builds its controls from."""
        m, v = self.models, self.models.vae.config
        out: dict[str, Any] = {
            "vae": {"path": str(m.vae_dir), "image_size": v.image_size, "channels": v.in_channels,
                    "depth": v.depth, "codebook_size": v.codebook_size,
                    "code_shape": list(m.vae.code_shape())},
            "ar": None, "max_images": self.max_images}
        if m.ar is not None:
            c = m.ar.config
            out["ar"] = {"path": str(m.ar_dir), "cond_type": c.cond_type, "classes": m.class_names,
                         "has_null_cond": c.has_null_cond, "prompt_len": c.cond_len}
        return out
