.PHONY: setup components demo demo-cluster test bench

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
