"""Test and simulation helpers that are not part of the running node (in the spirit of ``numpy.testing``).

:mod:`dicomnode.testing.scanner` is a fake scanner: it writes scanner-like PET and CT series from arrays,
for the tests, the benchmarks and ``upete simulate``. No node module imports it.
"""
