"""A throwaway test bed (network namespaces, veth, a cgroup) and the tiny client/server programs the
demo, the tests and the benchmarks run inside it. Everything it makes it removes."""
