.PHONY: setup demo test bench clean

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/python -m lb.testing.demo

test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python bench/connect_rate.py
	.venv/bin/python bench/program_time.py
	.venv/bin/python bench/pod_throughput.py
