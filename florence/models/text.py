"""CLIP-style text encoder: a pre-LayerNorm causal Transformer pooled at the end-of-text token."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from florence.models.layers import LayerNorm

_logger = logging.getLogger(__name__)


class TextAttention(nn.Module):
    """Causal multi-head self-attention with a fused QKV projection."""

    def __init__(self, width: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"text width {width} is not divisible by heads {heads}; choose heads that divide the width")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, device=device, dtype=dtype)
        self.proj = nn.Linear(width, width, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.proj(x.transpose(1, 2).reshape(batch, length, width))


class TextBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, device=None, dtype=None) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width, device=device, dtype=dtype)
        self.attn = TextAttention(width, heads, device=device, dtype=dtype)
        self.ln_2 = LayerNorm(width, device=device, dtype=dtype)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden, device=device, dtype=dtype),
            nn.GELU(),
            nn.Linear(hidden, width, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token embedding + learned positions + causal Transformer + final LayerNorm.

    The output is the final-norm hidden state at the end-of-text token, found as the argmax of
    the token ids because CLIP's vocabulary puts end-of-text last (id 49407), as CLIP does.

    Attention is causal and pooling reads the end-of-text position, so padding after the
    longest end-of-text token in the batch cannot change the output. ``forward`` therefore
    trims the batch to that length before running the blocks. The result is the same as running all
    ``context_length`` positions, at a fraction of the cost for short prompts.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(vocab_size, width, device=device, dtype=dtype)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width, device=device, dtype=dtype))
        self.blocks = nn.ModuleList(
            [TextBlock(width, heads, mlp_ratio, device=device, dtype=dtype) for _ in range(layers)]
        )
        self.ln_final = LayerNorm(width, device=device, dtype=dtype)
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    def init_weights(self) -> None:
        """Initialise as CLIP does: normal embeddings, depth-scaled residual projections."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (self.width**-0.5) * ((2 * len(self.blocks)) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.zeros_(block.mlp[0].bias)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            nn.init.zeros_(block.mlp[2].bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode ``tokens`` [B, L] (L <= context_length) into pooled features [B, width]."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"expected token ids of shape [batch, <= {self.context_length}], got {tuple(tokens.shape)}"
            )
        eot_index = tokens.argmax(dim=-1)
        length = int(eot_index.max()) + 1
        tokens = tokens[:, :length]

        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eot_index]
