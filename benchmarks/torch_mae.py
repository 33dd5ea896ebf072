"""The masked autoencoder (He et al. 2021) in plain PyTorch, timed beside models/mae.py.

The structure of the paper's released code, built from our `MAEConfig` so that every parameter
has a counterpart of the same size: a torch_models.ViT encoder run on the visible patches only
(random masking by the argsort of uniform noise, `int(L * (1 - mask_ratio))` kept), a linear map
to the decoder's width, a learned mask token in the masked positions, fixed sin-cos positions,
pre-LN decoder blocks, a final LayerNorm and a linear map to the p*p*C pixels of each patch; the
loss is the MSE over masked patches of (optionally per-patch normalised) pixels.
`load_mae_params` copies our weights across (the parity test).
"""

from __future__ import annotations

import torch
from torch import nn

from vistax.benchmarks import torch_models
from vistax.models import layers as jax_layers
from vistax.models import mae as jax_mae


class MAE(nn.Module):
    """Encoder (`vit`), `decoder_embed`, `mask_token`, `decoder_blocks`, `decoder_norm`,
    `decoder_pred`; forward(NCHW images, noise (B, L)) -> (pred (B, L, p*p*C), mask (B, L))."""

    def __init__(self, cfg: jax_mae.MAEConfig):
        super().__init__()
        self.cfg = cfg
        dec = cfg.decoder
        self.vit = torch_models.ViT(cfg.encoder)
        self.decoder_embed = nn.Linear(cfg.encoder.width, dec.width)
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dec.width))
        gh, gw = cfg.encoder.grid
        self.register_buffer("decoder_pos_embedding", torch.from_numpy(
            jax_layers.sincos_posemb_2d(gh, gw, dec.width, style="mae")), persistent=False)
        self.decoder_blocks = nn.ModuleList(torch_models.Block(dec) for _ in range(dec.depth))
        self.decoder_norm = nn.LayerNorm(dec.width, eps=dec.layernorm_eps)
        self.decoder_pred = nn.Linear(dec.width, cfg.patch_dim)
        torch_models.init_linears(self)

    def forward(self, images, noise):
        cfg = self.cfg
        b, length, keep = images.shape[0], cfg.num_patches, cfg.num_visible
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(b, length, device=images.device)
        mask[:, :keep] = 0.0
        mask = torch.gather(mask, 1, ids_restore)
        x = self.vit.encode(self.vit.tokens(images, keep=ids_shuffle[:, :keep]))
        x = self.decoder_embed(x)
        prefix = self.vit.num_prefix_tokens
        patches = torch.cat([x[:, prefix:], self.mask_token.expand(b, length - keep, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :prefix], patches + self.decoder_pos_embedding], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x)[:, prefix:]), mask

    def targets(self, images):
        """(B, L, p*p*C) pixels of each patch in (row, col, channel) order, normalised per
        patch by its mean and unbiased variance with `norm_pix_loss`."""
        b, c, h, w = images.shape
        p = self.cfg.encoder.patch_size
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        if self.cfg.norm_pix_loss:
            mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
            x = (x - mean) / (var + jax_mae.NORM_PIX_EPS) ** 0.5
        return x

    def loss(self, images, noise):
        pred, mask = self(images, noise)
        per_patch = ((pred.float() - self.targets(images)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)


def loss(model: MAE, batch: dict, config, device):
    """The step's loss: fresh masks every call, as the reference's `torch.rand` noise."""
    del config
    images = torch_models.images_nchw(batch, device)
    shape = (images.shape[0], model.cfg.num_patches)
    return lambda: model.loss(images, torch.rand(shape, device=images.device))


def load_mae_params(model: MAE, params: dict) -> None:
    """Copies our MAE's parameters (`nnx.state(mae, nnx.Param).to_pure_dict()`) across."""
    dec = model.cfg.decoder
    sd = {**torch_models.vit_state(model.vit, params["vit"], prefix="vit."),
          **torch_models.encoder_state(params["decoder"], dec.depth, dec.width, dec.qkv_bias,
                                       prefix="decoder_blocks.", norm="decoder_norm"),
          **torch_models.dense_state(params["decoder_embed"], "decoder_embed"),
          **torch_models.dense_state(params["decoder_pred"], "decoder_pred"),
          "mask_token": torch_models.to_tensor(params["mask_token"])}
    torch_models.load_state(model, sd)
