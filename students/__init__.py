"""The compact student: a stock Hugging Face speech encoder, prediction heads beside it, and
export to a plain model folder that `AutoModel` loads with no custom code.

Never imports `teachers` or `distill`.
"""

from .build import ARCHS, LOG_MEL_ARCHS, build_student, build_student_config, init_from_upstream
from .export import add_onnx, export_student, push_to_hub
from .onnx import ParityError, ParityReport, check_parity, export_onnx, quantize_int8
from .heads import HEAD_MODES, PredictionHeads
from .presets import PRESETS
from .frontend import (EncoderInputs, encoder_inputs, input_names, is_log_mel, make_feature_extractor, num_frames,
                       padding_invariant)
from .logmel import log_mel_features, make_log_mel_extractor
from .student import DistillStudent, StudentOutput, normalize_waveforms

__all__ = [
    "ARCHS",
    "LOG_MEL_ARCHS",
    "HEAD_MODES",
    "PRESETS",
    "build_student_config",
    "build_student",
    "init_from_upstream",
    "PredictionHeads",
    "DistillStudent",
    "StudentOutput",
    "normalize_waveforms",
    "EncoderInputs",
    "encoder_inputs",
    "num_frames",
    "is_log_mel",
    "input_names",
    "padding_invariant",
    "log_mel_features",
    "make_log_mel_extractor",
    "make_feature_extractor",
    "export_student",
    "push_to_hub",
    "add_onnx",
    "export_onnx",
    "quantize_int8",
    "check_parity",
    "ParityReport",
    "ParityError",
]
