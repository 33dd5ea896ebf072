"""Image-text retrieval: recall@k both ways over a whole split, with K captions per image.

Every image's embedding and its K captions' embeddings stay on device as global arrays, per
batch sharded like the batch. One jitted function then stacks them to (batches, B, ...) arrays
sharded along B (no data moves) and walks over the image (or text) batches: each step's
similarity block (B queries x all candidates) has its rows sharded over the batch mesh axes,
so no device, and no host, ever holds the whole (images x texts) matrix. Per query only the
rank of its true match is kept, and only the counts of ranks below each k reach the host.

Image -> text: a hit at k when one of the image's K captions is among the k texts most similar
to it; text -> image: when the caption's image is among the k most similar images. Padding
rows (`_mask` False) are never queries, and as candidates get similarity -inf so they are never
retrieved. A candidate as similar as the true match ranks before it (ties count against the
match, so a collapsed model scores 0, not 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vistax.evals.base import Evaluator, embed_split, encoder, require, to_host
from vistax.models.layers import l2_normalize

DEFAULT_KS = (1, 5, 10)
HIGHEST = jax.lax.Precision.HIGHEST


def _recall_counts(images, texts, masks, *, ks, rows, stacked):
    """Hit counts at each k, both ways, and the numbers of images and texts counted.

    images: per batch (B, D); texts: per batch (B, K, D); masks: per batch (B,) bool.
    `rows(ndim)` shards dimension 0 over the batch axes, `stacked(ndim)` dimension 1.
    """
    constrain = jax.lax.with_sharding_constraint
    img = constrain(l2_normalize(jnp.stack(images)), stacked(3))  # (N, B, D)
    txt = constrain(l2_normalize(jnp.stack(texts)), stacked(4))  # (N, B, K, D)
    valid = constrain(jnp.stack(masks), stacked(2))  # (N, B)
    n, b, k_caps = txt.shape[:3]
    image_id = constrain(jnp.arange(n * b, dtype=jnp.int32).reshape(n, b), stacked(2))
    neg_inf = jnp.float32(-jnp.inf)

    def image_to_text(query):  # one batch of images against every caption
        q, ids = query  # (B, D), (B,)
        sim = constrain(jnp.einsum("bd,mckd->bmck", q, txt, precision=HIGHEST), rows(4))
        sim = jnp.where(valid[None, :, :, None], sim, neg_inf)
        own = (ids[:, None, None, None] == image_id[None, :, :, None])  # (B, N, B, 1)
        best = jnp.max(jnp.where(own, sim, neg_inf), axis=(1, 2, 3))  # best own caption
        return jnp.sum((sim >= best[:, None, None, None]) & ~own, axis=(1, 2, 3))

    def text_to_image(query):  # one batch of captions against every image
        q, ids = query  # (B, K, D), (B,)
        sim = constrain(jnp.einsum("bkd,mcd->bkmc", q, img, precision=HIGHEST), rows(4))
        sim = jnp.where(valid[None, None], sim, neg_inf)
        own = (ids[:, None, None, None] == image_id[None, None])  # (B, 1, N, B)
        true = jnp.max(jnp.where(own, sim, neg_inf), axis=(2, 3))  # (B, K)
        return jnp.sum((sim >= true[:, :, None, None]) & ~own, axis=(2, 3))

    i2t_rank = jax.lax.map(image_to_text, (img, image_id))  # (N, B): texts ranked before
    t2i_rank = jax.lax.map(text_to_image, (txt, image_id))  # (N, B, K)
    text_valid = jnp.broadcast_to(valid[..., None], (n, b, k_caps))
    return {
        "i2t_hits": jnp.stack([jnp.sum((i2t_rank < k) & valid) for k in ks]),
        "t2i_hits": jnp.stack([jnp.sum((t2i_rank < k) & text_valid) for k in ks]),
        "num_images": jnp.sum(valid),
        "num_texts": jnp.sum(text_valid),
    }


class RetrievalEvaluator(Evaluator):
    """Recall@k image -> text and text -> image over a whole captioned split.

    Keys: dataset, split, pp (must yield `image` and integer `text` tokens: (L,) for one caption
    per image or (K, L) for K), batch_size (global), every, ks (default (1, 5, 10)),
    image_encoder and text_encoder (the objective's encoders; default 'image_embedding' and
    'text_embedding'). Metrics: i2t_recall@k, t2i_recall@k, num_images, num_texts.
    """

    def __init__(self, name, cfg, ctx):
        super().__init__(name, cfg, ctx)
        require(cfg, name, ("dataset", "split", "pp", "batch_size"))
        ks = cfg.get("ks", DEFAULT_KS)
        if (not isinstance(ks, (list, tuple)) or not ks
                or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks)):
            raise ValueError(f"evals.{name}.ks={ks!r} must be a non-empty list of positive ints.")
        self.ks = tuple(sorted(set(ks)))
        image_encoder = encoder(ctx, name, cfg, "image_encoder", "image_embedding")
        text_encoder = encoder(ctx, name, cfg, "text_encoder", "text_embedding")

        def embed(model, extra, batch):
            tokens = batch["text"]
            captions = tokens.reshape((-1, tokens.shape[-1]))  # (B * K, L), rows stay sharded
            text = text_encoder(model, extra, {"text": captions})
            return {"image": image_encoder(model, extra, batch),
                    "text": text.reshape((tokens.shape[0], -1, text.shape[-1]))}

        self._embed = ctx.compile(embed, outputs="device")
        self._recalls = jax.jit(
            functools.partial(_recall_counts, ks=self.ks,
                              rows=lambda ndim: ctx.sharded_along(0, ndim),
                              stacked=lambda ndim: ctx.sharded_along(1, ndim)),
            out_shardings=ctx.replicated)

    def check(self, example):
        key = f"evals.{self.name}.pp"
        text = np.asarray(example.get("text", ""))
        if "image" not in example or text.dtype.kind not in "iu" or text.ndim not in (1, 2):
            raise ValueError(f"{key}={self.cfg.pp!r} must yield 'image' and integer 'text' "
                             f"tokens of shape (L,) or (K, L); it gives "
                             f"{ {k: np.shape(v) for k, v in example.items()} }.")
        if text.size == 0:
            raise ValueError(f"{key}={self.cfg.pp!r} yields empty 'text' {text.shape}.")
        out = self._embed.check(key, example, self.cfg.batch_size)
        image, text = out["image"], out["text"]
        if image.ndim != 2 or image.shape[-1] != text.shape[-1]:
            raise ValueError(f"evals.{self.name}: image_encoder gives {image.shape} and "
                             f"text_encoder {text.shape[:1] + text.shape[2:]} per batch; "
                             "retrieval needs (batch, D) embeddings of one size D.")

    def run(self, state):
        outputs, masks = embed_split(self.ctx, self._embed, state, self.cfg)
        images, texts = [o["image"] for o in outputs], [o["text"] for o in outputs]
        counts = to_host(self._recalls(images, texts, masks))
        num_images, num_texts = int(counts["num_images"]), int(counts["num_texts"])
        out = {}
        for direction, total in (("i2t", num_images), ("t2i", num_texts)):
            for k, hits in zip(self.ks, counts[f"{direction}_hits"]):
                out[f"{direction}_recall@{k}"] = int(hits) / total
        out["num_images"] = float(num_images)
        out["num_texts"] = float(num_texts)
        return out
