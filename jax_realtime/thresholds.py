"""Whisper's decision thresholds, defined once: the long-form loop (``longform.py``), the streaming
policy (``config.StreamConfig``, ``streaming.py``), the engine's window fallback (``engine.py``) and
decoding (``decoding.py``) all take them from here.  No imports: the config module needs them too.
"""

# openai/whisper's transcribe() defaults
COMPRESSION_RATIO_THRESHOLD = 2.4  # gzip ratio above which Whisper treats output as repetitive
LOGPROB_THRESHOLD = -1.0  # average log-probability below which output is unlikely
NO_SPEECH_THRESHOLD = 0.6  # no-speech probability above which (with unlikely output) a window is silence
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # the fallback ladder for a rejected window

# No speech is faster than this: more text tokens than MAX_TOKENS_PER_SECOND per second of audio
# plus TOKEN_SLACK is Whisper looping on a clause (measured in docs, "Shorter encoder windows").
MAX_TOKENS_PER_SECOND = 6.0
TOKEN_SLACK = 4
