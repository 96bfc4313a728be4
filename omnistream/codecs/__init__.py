"""Pure, synchronous media conversions: wire framing, PCM, JPEG, images.

Nothing in this package touches asyncio, sockets or model code, so every function here
can run in a worker thread or a test without an event loop.
"""
