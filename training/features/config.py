"""Settings of the features stage. The encoders' contract (dims, preprocessing) is
`mml.encoders.EncoderSpec`, shared with the service; this adds how the stage runs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mml.encoders import EncoderSpec


class FeaturesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: EncoderSpec = EncoderSpec()  # encoders and preprocessing (written to encoders/encoders.json)
    batch_size: int = Field(64, ge=1)  # items per encoder call
    threads: int = Field(2, ge=1)  # torch and onnxruntime intra-op threads (the CI machine has 2 cores)
    opset: int = Field(17, ge=17)  # ONNX opset of the exported graphs
    parity_samples: int = Field(32, ge=1)  # items encoded by both torch and ONNX to check the export
    parity_min_cosine: float = Field(0.999, gt=0.0, le=1.0)  # export refused below this torch/ONNX cosine
