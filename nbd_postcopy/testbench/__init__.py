"""The test bench: the checker guest, QEMU VMs with their consoles, the demo."""
