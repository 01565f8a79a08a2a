"""Tests of keyval.net, the trio transport."""
