// SPDX-License-Identifier: Apache-2.0
/*
 * bpflb-cni: the executable the container runtime runs from its CNI bin directory. Nodes may have no
 * Python, so this static binary only hands the request (CNI_* environment and stdin) to the bpflb agent
 * over a unix socket and relays its answer, as Cilium's plugin does.
 *
 * Wire format (all integers u32, little-endian):
 *   request:  n_env, then n_env x (len, "KEY=VALUE"), then stdin_len, stdin bytes
 *   response: exit_code, stdout_len, stdout bytes
 * Socket: $BPFLB_CNI_SOCKET, else /run/bpflb/cni.sock.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

static void fail(const char *what, int err)
{
	const char *cmd = getenv("CNI_COMMAND");
	int code = (cmd && strcmp(cmd, "STATUS") == 0) ? 50 : 11; /* not available / try again later */
	const char *path = getenv("BPFLB_CNI_SOCKET") ? getenv("BPFLB_CNI_SOCKET") : "/run/bpflb/cni.sock";
	printf("{\"cniVersion\":\"1.1.0\",\"code\":%d,\"msg\":\"bpflb agent not reachable at %s: %s: %s\"}\n",
	       code, path, what, strerror(err));
	exit(1);
}

static void put_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fail("write", errno);
		}
		p += n;
		len -= (size_t)n;
	}
}

static void get_all(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		ssize_t n = read(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			fail("read", n == 0 ? ECONNRESET : errno);
		p += n;
		len -= (size_t)n;
	}
}

static void put_u32(int fd, uint32_t v)
{
	put_all(fd, &v, sizeof(v));
}

int main(void)
{
	const char *path = getenv("BPFLB_CNI_SOCKET") ? getenv("BPFLB_CNI_SOCKET") : "/run/bpflb/cni.sock";
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t cap = 1 << 16, len = 0;
	char *in = malloc(cap);
	uint32_t n_env = 0, rc, out_len;
	char **e;
	int fd;

	if (!in)
		fail("malloc", ENOMEM);
	for (;;) { /* the network configuration on stdin */
		ssize_t n = read(0, in + len, cap - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			fail("read stdin", errno);
		if (n == 0)
			break;
		len += (size_t)n;
		if (len == cap && !(in = realloc(in, cap *= 2)))
			fail("realloc", ENOMEM);
	}
	if (strlen(path) >= sizeof(sa.sun_path))
		fail("socket path", ENAMETOOLONG);
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0)
		fail("socket", errno);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		fail("connect", errno);
	for (e = environ; *e; e++)
		if (strncmp(*e, "CNI_", 4) == 0)
			n_env++;
	put_u32(fd, n_env);
	for (e = environ; *e; e++) {
		if (strncmp(*e, "CNI_", 4) != 0)
			continue;
		put_u32(fd, (uint32_t)strlen(*e));
		put_all(fd, *e, strlen(*e));
	}
	put_u32(fd, (uint32_t)len);
	put_all(fd, in, len);
	get_all(fd, &rc, sizeof(rc));
	get_all(fd, &out_len, sizeof(out_len));
	char *out = malloc(out_len + 1);
	if (!out)
		fail("malloc", ENOMEM);
	get_all(fd, out, out_len);
	fwrite(out, 1, out_len, stdout);
	return (int)rc;
}
