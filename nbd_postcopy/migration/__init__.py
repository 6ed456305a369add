"""The migration driver: locate guest RAM in QEMU, and migrate a VM through the whole stack."""
