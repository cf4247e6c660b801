"""The bundled CNI plugin: pod network attachments, IPAM, and the launcher the runtime executes."""
