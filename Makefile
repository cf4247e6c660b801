.PHONY: setup components demo demo-cluster test bench conformance

setup:
	./scripts/setup.sh

components: setup
	./scripts/build-components.sh

demo: setup
	.venv/bin/python -m lb.testing.demo

demo-cluster: components
	.venv/bin/python -m lb.testing.demo_cluster

test: components
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
conformance: components
	./scripts/build-components.sh --node
	./scripts/build-node-images.sh
	.venv/bin/python -m lb.testing.conformance
