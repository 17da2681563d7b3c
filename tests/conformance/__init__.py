"""Conformance cases: raw bytes in, exact outcomes expected, each resting on an RFC section.

A package (unlike the other test folders) so that its modules have names of their
own (conformance.test_client next to http/test_client.py), and so that a bench
script can import the case tables and the harness without pytest.
"""
