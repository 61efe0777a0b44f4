"""The load-and-fault script (``load_and_fault.py``); a package so the suite imports it by name."""
