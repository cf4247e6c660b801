"""bpflb: a kube-proxy replacement that load-balances Kubernetes Services with BPF."""

__version__ = "0.1.0"
