"""vbhal's conformance suite: the checks every backend passes on its device.

Run it for a device with ``vbhal conformance --device X [--report FILE.md]`` (it ships in the wheel), or
from a plug-in author's own pytest run: this package is also a pytest plug-in (``--vbhal-device``).
The checks: the probe contract; every bound kernel against its reference (bit-exact for the FP4 codecs,
tolerances per dtype for matmul and attention, gradients included); and ``optimize`` on a small GPT.
"""
