"""FetalCLIPSEG network (open_clip ViT + LoRA + UNETR decoder + frame head) and its checkpoint format."""
from algorithm.model.checkpoint import (CheckpointError, CheckpointInfo, load_checkpoint, read_checkpoint_info,
                                        save_checkpoint)
from algorithm.model.encoder import FETALCLIP_CONFIG, FetalCLIPEncoder, WeightsError, load_fetalclip_visual
from algorithm.model.fetalclipseg import (FetalCLIPSeg, SegOutput, build_model, total_parameters,
                                          trainable_parameters)

__all__ = [
    "CheckpointError", "CheckpointInfo", "load_checkpoint", "read_checkpoint_info", "save_checkpoint",
    "FETALCLIP_CONFIG", "FetalCLIPEncoder", "WeightsError", "load_fetalclip_visual",
    "FetalCLIPSeg", "SegOutput", "build_model", "total_parameters", "trainable_parameters",
]
