"""The only code that touches BPF maps. Byte order is converted here and nowhere else."""
