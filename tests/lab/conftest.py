"""Tests that run INSIDE the kernel lab, on Debian 12's own kernel (nbd_postcopy/testbench/lab.py).

On the host they are not even collected: tests/testbench/test_lab.py boots the lab and runs
`pytest tests/lab` inside it, and reports each module's result. Inside, NBD_POSTCOPY_LAB=1.
"""

from nbd_postcopy.testbench.lab import in_lab

collect_ignore_glob = [] if in_lab() else ["test_*.py"]
