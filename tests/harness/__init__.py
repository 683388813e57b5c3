"""The test harness, which the benchmark and evaluation scripts use too (never the other way round).

* ``realtime_client``: audio helpers, a server child process (:class:`ServerProcess`), the
  ``/v1/realtime`` client (:class:`RealtimeClient`) and one timed stream (:func:`stream_audio`).
* ``service_config``: :func:`write_config`, the service TOML a test server runs on.
* ``cues``: parsers and checks of SRT/WebVTT output.

Tests import it as ``harness`` (pytest puts ``tests/`` on ``sys.path``: ``tests/`` has no
``__init__.py``); scripts put ``tests/`` on ``sys.path`` first.
"""
