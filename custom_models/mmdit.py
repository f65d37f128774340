"""MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers", the SD3 backbone).

Two token streams, image patches and context tokens, each with its own weights; every block attends
jointly over their concatenation, with RMSNorm on queries and keys. The context is either a learned
token sequence per class (class-conditional use) or external text embeddings (`encoder_hidden_states`
plus `pooled_projections`). Timestep plus pooled condition drive the adaLN modulation of both streams.
Patchify, position table, MLP and final layer are the DiT's (`dit_gqa.py`).
"""

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from .attention import check_head_config, check_key_mask, grouped_query_attention
from .dit_gqa import (
    FeedForward,
    FinalLayer,
    PositionTable,
    check_sample,
    check_transformer_config,
    modulate,
    patchify,
    unpatchify,
)
from .embeddings import (
    LabelEmbedding,
    PooledProjection,
    TimestepEmbedding,
    check_class_labels,
    check_pooled_projections,
    timesteps_to_batch,
)
from .loading import CheckedLoadingMixin


# --------------------------------------------------------------------------------------------------
# Joint attention and the two-stream block
# --------------------------------------------------------------------------------------------------
class JointAttention(nn.Module):
    """Attention over image and context tokens together, with separate projections per stream.

    Names follow diffusers' SD3 attention (`to_q`... for the image stream, `add_q_proj`... and
    `to_add_out` for the context stream), so LoRA target modules read the same.
    """

    def __init__(self, dim: int, num_attention_heads: int, num_kv_heads: int, context_pre_only: bool = False):
        super().__init__()
        check_head_config(dim, num_attention_heads, num_kv_heads)
        self.num_attention_heads = num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_attention_heads
        kv_dim = num_kv_heads * self.head_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, kv_dim)
        self.to_v = nn.Linear(dim, kv_dim)
        self.add_q_proj = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, kv_dim)
        self.add_v_proj = nn.Linear(dim, kv_dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_added_q = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.norm_added_k = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.to_out = nn.Linear(dim, dim)
        # The last block's context tokens are only read (keys/values), never written back.
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, num_image_tokens, dim = hidden_states.shape
        num_tokens = num_image_tokens + context.shape[1]

        def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
            return x.view(batch, x.shape[1], num_heads, self.head_dim)

        # Concatenate along tokens while still [batch, tokens, heads, head_dim]: one copy per tensor.
        query = torch.cat(
            [
                self.norm_q(heads(self.to_q(hidden_states), self.num_attention_heads)),
                self.norm_added_q(heads(self.add_q_proj(context), self.num_attention_heads)),
            ],
            dim=1,
        )
        key = torch.cat(
            [
                self.norm_k(heads(self.to_k(hidden_states), self.num_kv_heads)),
                self.norm_added_k(heads(self.add_k_proj(context), self.num_kv_heads)),
            ],
            dim=1,
        )
        value = torch.cat(
            [heads(self.to_v(hidden_states), self.num_kv_heads), heads(self.add_v_proj(context), self.num_kv_heads)],
            dim=1,
        )
        # Image tokens are always attended to; masked context tokens (a prompt's padding) never.
        key_mask = None
        if context_mask is not None:
            key_mask = torch.cat([context_mask.new_ones(batch, num_image_tokens), context_mask], dim=1)
        out = grouped_query_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_mask)
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        image_out = self.to_out(out[:, :num_image_tokens])
        context_out = None if self.to_add_out is None else self.to_add_out(out[:, num_image_tokens:])
        return image_out, context_out


class JointTransformerBlock(nn.Module):
    """adaLN-Zero block with one set of weights per stream and one joint attention."""

    def __init__(
        self, dim: int, num_attention_heads: int, num_kv_heads: int, mlp_ratio: float, context_pre_only: bool = False
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm1_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(dim, num_attention_heads, num_kv_heads, context_pre_only)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)
        if context_pre_only:
            # Only shift/scale for the context norm: nothing after the attention uses the context.
            self.adaLN_modulation_context = nn.Linear(dim, 2 * dim)
        else:
            self.adaLN_modulation_context = nn.Linear(dim, 6 * dim)
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim, int(dim * mlp_ratio))

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        conditioning: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(conditioning).chunk(
            6, dim=1
        )
        context_modulation = self.adaLN_modulation_context(conditioning)
        if self.context_pre_only:
            c_shift_msa, c_scale_msa = context_modulation.chunk(2, dim=1)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = context_modulation.chunk(
                6, dim=1
            )

        attn_output, context_attn_output = self.attn(
            modulate(self.norm1(hidden_states), shift_msa, scale_msa),
            modulate(self.norm1_context(context), c_shift_msa, c_scale_msa),
            context_mask,
        )
        hidden_states = torch.addcmul(hidden_states, gate_msa.unsqueeze(1), attn_output)
        ff_output = self.ff(modulate(self.norm2(hidden_states), shift_mlp, scale_mlp))
        hidden_states = torch.addcmul(hidden_states, gate_mlp.unsqueeze(1), ff_output)
        if self.context_pre_only:
            return hidden_states, None

        context = torch.addcmul(context, c_gate_msa.unsqueeze(1), context_attn_output)
        context_ff_output = self.ff_context(modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return hidden_states, torch.addcmul(context, c_gate_mlp.unsqueeze(1), context_ff_output)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class ScratchMMDiTModel(CheckedLoadingMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """SD3-style MMDiT: class-token or text context, joint attention with RMSNorm on Q/K and grouped K/V heads."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["JointTransformerBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]
    default_lora_target_modules = [
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    ]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        out_channels: int | None = None,
        patch_size: int = 4,
        hidden_size: int = 192,
        num_layers: int = 6,
        num_attention_heads: int = 6,
        num_kv_heads: int | None = None,
        mlp_ratio: float = 4.0,
        num_classes: int | None = 10,
        num_class_tokens: int = 4,
        joint_attention_dim: int | None = None,
        pooled_projection_dim: int | None = None,
        learn_sigma: bool = False,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_attention_heads  # None: plain multi-head attention, as in SD3
        check_transformer_config(sample_size, patch_size, hidden_size)
        check_head_config(hidden_size, num_attention_heads, num_kv_heads)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1; got {num_layers}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1; got {num_classes}.")
        if joint_attention_dim is None and num_class_tokens < 1:
            raise ValueError(
                f"num_class_tokens must be >= 1 for an MMDiT without text context; got {num_class_tokens}."
            )
        if (joint_attention_dim is None) != (pooled_projection_dim is None):
            raise ValueError(
                "Text conditioning needs both joint_attention_dim and pooled_projection_dim; got "
                f"joint_attention_dim={joint_attention_dim}, pooled_projection_dim={pooled_projection_dim}."
            )
        self.out_channels = (out_channels or in_channels) * (2 if learn_sigma else 1)
        self.gradient_checkpointing = False

        self.patch_embed = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.position_table = PositionTable(hidden_size, sample_size // patch_size)
        self.time_embed = TimestepEmbedding(hidden_size)
        if num_classes:
            self.class_embed = LabelEmbedding(num_classes, hidden_size)
            # One learned context sequence per class, the null class included (row num_classes).
            self.class_tokens = nn.Embedding(num_classes + 1, num_class_tokens * hidden_size)
        elif joint_attention_dim is None:
            # Unconditional: the joint attention still needs a context stream, one learned sequence for every image.
            self.unconditional_tokens = nn.Embedding(1, num_class_tokens * hidden_size)
        if joint_attention_dim is not None:
            self.context_embedder = nn.Linear(joint_attention_dim, hidden_size)
            self.pooled_embed = PooledProjection(pooled_projection_dim, hidden_size)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    hidden_size, num_attention_heads, num_kv_heads, mlp_ratio, context_pre_only=i == num_layers - 1
                )
                for i in range(num_layers)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """xavier linears, N(0, 0.02) embeddings, adaLN-Zero (modulation and output layers start at 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        zero_init = [self.final_layer.adaLN_modulation, self.final_layer.linear]
        for block in self.transformer_blocks:
            zero_init += [block.adaLN_modulation, block.adaLN_modulation_context]
        for layer in zero_init:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ScratchMMDiTModel":
        """Build a model from a named size preset in `PRESETS`, with config overrides."""
        if name not in PRESETS:
            raise ValueError(f"Unknown MMDiT preset {name!r}; available: {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def _context(
        self,
        batch_size: int,
        device: torch.device,
        class_labels: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        pooled_projections: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context tokens `[batch, tokens, dim]` and pooled condition `[batch, dim]` for either conditioning mode."""
        config = self.config
        if encoder_hidden_states is not None:
            if config.joint_attention_dim is None:
                raise ValueError(
                    "This MMDiT has no text context (joint_attention_dim is None): pass `class_labels` instead of "
                    "`encoder_hidden_states`."
                )
            if class_labels is not None:
                raise ValueError(
                    "Pass either `class_labels` or `encoder_hidden_states` + `pooled_projections`, not both."
                )
            if (
                encoder_hidden_states.ndim != 3
                or encoder_hidden_states.shape[0] != batch_size
                or encoder_hidden_states.shape[2] != config.joint_attention_dim
            ):
                raise ValueError(
                    f"`encoder_hidden_states` must be [batch={batch_size}, tokens, joint_attention_dim={config.joint_attention_dim}]; "
                    f"got {tuple(encoder_hidden_states.shape)}."
                )
            check_pooled_projections(pooled_projections, batch_size, config.pooled_projection_dim, "MMDiT")
            return self.context_embedder(encoder_hidden_states), self.pooled_embed(pooled_projections)
        if not config.num_classes and config.joint_attention_dim is None:
            if class_labels is not None:
                raise ValueError("This MMDiT is unconditional (num_classes is None): pass no `class_labels`.")
            context = self.unconditional_tokens.weight.view(1, config.num_class_tokens, config.hidden_size)
            context = context.expand(batch_size, -1, -1)
            return context, torch.zeros(batch_size, config.hidden_size, device=device, dtype=context.dtype)
        if not config.num_classes:
            raise ValueError(
                "This MMDiT is text-conditioned (num_classes is None): pass `encoder_hidden_states` "
                f"[batch, tokens, {config.joint_attention_dim}] and `pooled_projections` [batch, {config.pooled_projection_dim}]."
            )
        class_labels = check_class_labels(class_labels, config.num_classes, batch_size).to(device)
        context = self.class_tokens(class_labels).view(batch_size, config.num_class_tokens, config.hidden_size)
        return context, self.class_embed(class_labels)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> Transformer2DModelOutput | tuple:
        """Predict the denoising target for `sample` at `timestep`, given class labels or text embeddings.

        `encoder_attention_mask` (`[batch, tokens]`, True or 1 = a real token) hides the padding of
        `encoder_hidden_states` from the joint attention.
        """
        config = self.config
        check_sample(sample, config.in_channels, config.sample_size)
        batch_size = sample.shape[0]
        context, pooled = self._context(
            batch_size, sample.device, class_labels, encoder_hidden_states, pooled_projections
        )
        context_mask = None
        if encoder_attention_mask is not None:
            if encoder_hidden_states is None:
                raise ValueError("`encoder_attention_mask` masks `encoder_hidden_states`: pass them too.")
            context_mask = check_key_mask(encoder_attention_mask.to(sample.device), batch_size, context.shape[1])
        timesteps = timesteps_to_batch(timestep, batch_size, sample.device)
        # Every adaLN linear reads SiLU(c): compute it once instead of once per block.
        conditioning = F.silu(self.time_embed(timesteps) + pooled)

        hidden_states = patchify(sample, self.patch_embed)
        hidden_states = hidden_states + self.position_table(sample.device).to(hidden_states.dtype)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states, context = self._gradient_checkpointing_func(
                    block, hidden_states, context, conditioning, context_mask
                )
            else:
                hidden_states, context = block(hidden_states, context, conditioning, context_mask)
        hidden_states = self.final_layer(hidden_states, conditioning)
        output = unpatchify(
            hidden_states, config.sample_size // config.patch_size, config.patch_size, self.out_channels
        )
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)


# --------------------------------------------------------------------------------------------------
# Size presets (architecture only: sample_size, in_channels and num_classes come from the data)
# --------------------------------------------------------------------------------------------------
PRESETS = {
    # For tests: < 100k parameters.
    "tiny": dict(patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, num_class_tokens=2),
    # Parameter-matched to the UNet and DiT "iso-1.7m" presets for the fair comparison.
    "iso-1.7m": dict(
        patch_size=4, hidden_size=112, num_layers=4, num_attention_heads=4, num_kv_heads=4, num_class_tokens=4
    ),
    # A quick real-training size; the width and depth of the `SD3Transformer2DModel` in benchmarks/bench_models.py.
    "small": dict(
        patch_size=4, hidden_size=192, num_layers=6, num_attention_heads=6, num_kv_heads=6, num_class_tokens=4
    ),
}
