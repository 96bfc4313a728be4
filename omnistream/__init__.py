"""omnistream: a realtime streaming media engine.

Avatar front-ends stream speech audio in and get talking-head video back, TTS consumers
get PCM while it is synthesised, browsers watch an avatar over WebRTC, and batch callers
run offline generation, all on one scheduler that keeps models resident and shares them
across every live session.
"""

__version__ = "0.1.0"
