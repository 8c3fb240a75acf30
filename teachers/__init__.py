"""Teachers: frozen upstream speech encoders, their alignment and fusion into distillation targets."""

from .align import align_frames, align_layers, wav2vec_num_frames
from .custom import trust_upstream_code
from .fused import CONFIG_NAME, FusedTeacher, TeacherOutput, canonical_spec, read_saved_config
from .inputs import frame_mask
from .interfaces import AddHConv, CHConv, HConv, WeightedSum
from .report import describe
from .upstream import Upstream, UpstreamOutput, load_upstream

__all__ = [
    "load_upstream",
    "Upstream",
    "UpstreamOutput",
    "align_layers",
    "align_frames",
    "wav2vec_num_frames",
    "frame_mask",
    "WeightedSum",
    "HConv",
    "CHConv",
    "AddHConv",
    "FusedTeacher",
    "canonical_spec",
    "read_saved_config",
    "CONFIG_NAME",
    "TeacherOutput",
    "describe",
    "trust_upstream_code",
]
