"""Thin protocol edges: HTTP routes, WebSocket protocols and WebRTC.

Transports translate a wire protocol into session calls and back; they make no model or
scheduling decisions of their own.
"""
