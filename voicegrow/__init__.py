"""VoiceGrow: a streaming voice-assistant server for smart speakers."""

__version__ = "0.1.0"
