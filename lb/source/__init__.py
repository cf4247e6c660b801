"""Sources of Kubernetes objects: a manifest folder (standalone) or the API server."""
