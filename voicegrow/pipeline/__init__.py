"""The pipeline stages: VAD, ASR (with its guards and model resolution), LLM, sentence splitting, TTS.

Each stage takes audio or text in and gives audio or text out. None of them knows a socket, a session,
storage or HTTP (``tests/test_layers.py`` holds them to it): what a stage needs (settings, metrics, a
model cache) is passed in by the wiring (``services.py``) or the session core (``streaming/``).
"""
