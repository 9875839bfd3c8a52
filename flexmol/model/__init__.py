"""The FlexMol network: input representations, shared-attention encoders, cross-modal decoders,
feature learners, the multi-modal encoder and the pre-training heads."""
from flexmol.model.network import (CrossModalDecoder, Decoder2Dto3D, Decoder3Dto2D, FeatureLearner2D,
                                   FeatureLearner3D, FlexMol, ModelConfig, MultiModalEncoder)

__all__ = ["CrossModalDecoder", "Decoder2Dto3D", "Decoder3Dto2D", "FeatureLearner2D", "FeatureLearner3D", "FlexMol",
           "ModelConfig", "MultiModalEncoder"]
