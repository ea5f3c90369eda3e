"""assistant: a local, private voice assistant pipeline.

Private means nothing leaves the machine. ONNX Runtime (Silero VAD, Piper voices) sends usage telemetry from its
official Linux and macOS builds since 1.25 (1DS: a device identifier, session and model events, an offline cache such
as ``$TMPDIR/.ses``) unless ``ORT_DISABLE_TELEMETRY=1`` is set before it starts (microsoft/onnxruntime#27379), so it
is set here, before any stage can import it. Setting it to 0 yourself keeps ONNX Runtime's default.
"""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
