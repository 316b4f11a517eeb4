"""The stream protocol shared by producers, workers and every consumer; never imports torch.

The wire format (docs/wire-format.md) is importable from here directly:

    from crd_model.stream import Frame, Result, make_frame, pack_frame, unpack_result

Modules: `messages` (pydantic models, limits, `WireError`), `codecs` (image, point-map and anomaly-map
payloads), `packing` (msgpack), `redis_streams` (connections, groups, trimming), `results` (a results
consumer), `settings` (one typed settings object), `daemon` (the lifecycle every daemon shares),
`observability` (health and metrics endpoints), `logs` (structlog), `embedded` (a Valkey for tests/demo).
"""

from crd_model.stream.codecs import (
    decode_map,
    decode_rgb,
    decode_xyz,
    encode_map,
    encode_rgb,
    encode_xyz,
    quantised_map,
)
from crd_model.stream.messages import (
    DEFAULT_LIMITS,
    WIRE_VERSION,
    AnomalyMap,
    ErrorInfo,
    Frame,
    Limits,
    PointMap,
    Region,
    Result,
    RGBImage,
    Shadow,
    Timings,
    WireError,
)
from crd_model.stream.packing import (
    frame_arrays,
    make_frame,
    pack_frame,
    pack_result,
    peek_frame_id,
    unpack_frame,
    unpack_result,
)

__all__ = [
    "DEFAULT_LIMITS",
    "WIRE_VERSION",
    "AnomalyMap",
    "ErrorInfo",
    "Frame",
    "Limits",
    "PointMap",
    "RGBImage",
    "Region",
    "Result",
    "Shadow",
    "Timings",
    "WireError",
    "decode_map",
    "decode_rgb",
    "decode_xyz",
    "encode_map",
    "encode_rgb",
    "encode_xyz",
    "frame_arrays",
    "make_frame",
    "pack_frame",
    "pack_result",
    "peek_frame_id",
    "quantised_map",
    "unpack_frame",
    "unpack_result",
]
