"""Tests of the wire package: framing, codec, messages, secure channel."""
