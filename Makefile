.PHONY: setup components node-components demo demo-cluster test bench conformance conformance-two-node

setup:
	./scripts/setup.sh

components: setup
	./scripts/build-components.sh

demo: setup
	.venv/bin/python -m lb.testing.demo

demo-cluster: components
	.venv/bin/python -m lb.testing.demo_cluster

# The node's components and images (kubelet, controller-manager, scheduler, e2e.test, agnhost, CoreDNS;
# pause, agnhost, CoreDNS, nginx images): tests/test_node*.py and tests/test_conformance.py need them.
node-components: components
	./scripts/build-components.sh --node
	./scripts/build-node-images.sh

test: node-components
	.venv/bin/python -m pytest -q

bench: components
	.venv/bin/python bench/connect_rate.py
	.venv/bin/python bench/program_time.py
	.venv/bin/python bench/pod_throughput.py
	.venv/bin/python bench/api_sync.py
	.venv/bin/python bench/cni_add_latency.py
	.venv/bin/python bench/nodeport.py

# A real node (kubelet, containerd, bpflb from `kubectl apply -k manifests/`, no kube-proxy) and upstream's
# Service conformance tests against it; JUnit in results/conformance/. See README, "On a real node".
conformance: node-components
	.venv/bin/python -m lb.testing.conformance

# Two nodes on this machine (the second: containerd + kubelet only): the same set across them and the
# two-node specs of service.go (traffic policies, source IP, terminating endpoints, health-check NodePort);
# JUnit in results/conformance-two-node/.
conformance-two-node: node-components
	.venv/bin/python -m lb.testing.conformance --nodes 2
