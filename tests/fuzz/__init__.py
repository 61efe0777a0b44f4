"""Long fuzz runs (``fuzz_parser.py``, ``fuzz_session.py``) and the session model they share.

A package, so that ``fuzz.session_model`` is found here first, before any other ``fuzz``.
"""
