"""``omnistream bench``: a latency harness for any compatible avatar or TTS server.

The harness is a client only: it speaks the public protocols of PROTOCOLS.md (FlashTalk
and native avatar WebSockets, text-to-audio and OpenAI speech HTTP streams), so the same
run can measure omnistream or any other server that implements them. Modules:

- :mod:`omnistream.bench.audio`: speech-like input audio (synthesised or from a file).
- :mod:`omnistream.bench.avatar`: paced avatar sessions, ramps.
- :mod:`omnistream.bench.tts`: streaming TTS requests with real-time playback simulation.
- :mod:`omnistream.bench.stats`: percentiles and per-run summaries.
- :mod:`omnistream.bench.report`: versioned JSON report and the Markdown table.
- :mod:`omnistream.bench.plots`: PNG plots (matplotlib, Agg backend).
- :mod:`omnistream.bench.cli`: the ``bench`` subcommand.
"""

SCHEMA_VERSION = "1.0.0"
