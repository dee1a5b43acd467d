"""ModelConfig: the architecture of MML. Defaults = the paper (Sec. 4.2-4.3, 5.1.3) and, where the
paper is silent, the authors' reference code (RecBole SASRec settings). See docs/model.md."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- SASRec base of every learner (paper Sec. 4.2.1; reference code for what the paper omits) ---
    d: int = Field(64, ge=2, description="hidden / embedding size d (paper 5.1.3: 64)")
    n_layers: int = Field(2, ge=1, description="self-attention blocks L (reference: 2)")
    n_heads: int = Field(2, ge=1, description="attention heads h (reference: 2)")
    d_ffn: int = Field(256, ge=1, description="inner size of the point-wise FFN, Eq. 6 (reference: 256)")
    max_len: int = Field(
        50, ge=2, description="max sequence length n; right-padded, pad id 0 (reference: 50)"
    )
    dropout_hidden: float = Field(0.5, ge=0.0, lt=1.0, description="hidden dropout (reference: 0.5)")
    dropout_attn: float = Field(
        0.5, ge=0.0, lt=1.0, description="attention-probability dropout (reference: 0.5)"
    )
    activation: Literal["gelu", "relu"] = Field(
        "gelu", description="FFN activation: Eq. 6 writes ReLU, the reference code (RecBole SASRec) uses GELU"
    )
    ln_eps: float = Field(1e-12, gt=0.0, description="LayerNorm epsilon (reference: 1e-12)")
    init_std: float = Field(
        0.02, gt=0.0, description="std of the normal init of Linear/Embedding (reference)"
    )

    # --- item side information (docs/architecture.md section 3) ---
    text_dim: int = Field(384, ge=1, description="text feature size (all-MiniLM-L6-v2)")
    image_dim: int = Field(1280, ge=1, description="image feature size (EfficientNet-Lite0 pooled)")

    # --- feature-aware self-attention, Eq. 2-3 (our reading: docs/model.md) ---
    feature_bias: bool = Field(True, description="add the Eq. 3 bias to the ID learner's attention logits")
    feature_sim_dim: int = Field(
        64,
        ge=1,
        description="size of the learned projection of text/image features whose cosines give S_te, S_im",
    )
    feature_bias_init: float = Field(
        1.0,
        description="initial value of every position-pair weight W_te^h, W_im^h (bias starts = S_te + S_im)",
    )

    # --- cold-start item embedding generator, Eq. 14-17 ---
    n_neighbours: int = Field(10, ge=1, description="K old neighbours per item, Eq. 14 (reference: 5-10)")
    generator_activation: Literal["relu", "none"] = Field(
        "relu", description="the non-linearity of Eq. 16 (paper: ReLU)"
    )

    # --- co-occurrence learner (beyond the paper: mml/cooc.py, docs/model.md) ---
    cooc_neighbours: int = Field(
        0,
        ge=0,
        description="M, neighbours per item in the co-occurrence table; 0 = no co-occurrence learner "
        "(the paper's three learners). With M > 0 a second fusion layer weighs the fourth learner",
    )

    # --- fusion layer, Eq. 9-13 ---
    fusion_hidden: int = Field(
        128, ge=1, description="hidden size of the fusion attention MLP (paper 5.1.3: 128)"
    )

    @model_validator(mode="after")
    def _heads_divide_d(self) -> ModelConfig:
        if self.d % self.n_heads:
            raise ValueError(f"d={self.d} must be divisible by n_heads={self.n_heads}")
        return self
