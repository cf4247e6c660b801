// SPDX-License-Identifier: Apache-2.0
/*
 * bpflb-cni: the executable the container runtime runs from its CNI bin directory. Nodes may have no
 * Python, so this static binary (gcc -static -O2) only hands the request (the CNI_* environment and
 * stdin) to the bpflb agent over a unix socket and relays its answer, as Cilium's plugin does.
 *
 * Wire format (all integers u32, little-endian; one request per connection; lb/cni/server.py):
 *   request:  n_env, then n_env x (len, "CNI_KEY=VALUE"), then stdin_len, stdin bytes
 *   response: exit_code, stdout_len, stdout bytes
 *
 * Socket: $BPFLB_CNI_SOCKET, else the configuration's top-level "agentSocket", else /run/bpflb/cni.sock.
 * Agent unreachable (or gone mid-request): a CNI error on stdout, code 11 "try again later" (50 "plugin
 * not available" for STATUS), in the cniVersion the configuration asked for, and exit status 1.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef DEFAULT_SOCKET /* lb/cni/install.py passes settings.CNI_SOCKET_DEFAULT */
#define DEFAULT_SOCKET "/run/bpflb/cni.sock"
#endif
#define E_TRY_AGAIN 11
#define E_NOT_AVAILABLE 50

extern char **environ;

static const char *const supported[] = { "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0" };
static char version[16] = "1.1.0"; /* of the error we may print: the one asked for, if we speak it */
static const char *sock_path = DEFAULT_SOCKET;

static void put_json_string(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c < 0x20)
			printf("\\u%04x", c);
		else
			putchar(c);
	}
	putchar('"');
}

static void fail(const char *what, int err)
{
	const char *cmd = getenv("CNI_COMMAND");
	int code = (cmd && strcmp(cmd, "STATUS") == 0) ? E_NOT_AVAILABLE : E_TRY_AGAIN;
	char msg[512 + sizeof(((struct sockaddr_un *)0)->sun_path)];

	snprintf(msg, sizeof(msg), "bpflb agent not reachable at %s: %s: %s", sock_path, what, strerror(err));
	printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":", version, code);
	put_json_string(msg);
	printf("}\n");
	fflush(stdout);
	fprintf(stderr, "bpflb-cni: %s\n", msg);
	exit(1);
}

/* ---- just enough JSON to read two top-level string fields of the configuration ---- */

static const char *skip_ws(const char *p, const char *end)
{
	while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return p;
}

/* p at the opening quote; returns the position after the closing one, or NULL */
static const char *skip_string(const char *p, const char *end)
{
	for (p++; p < end; p++) {
		if (*p == '\\')
			p++;
		else if (*p == '"')
			return p + 1;
	}
	return NULL;
}

static const char *skip_value(const char *p, const char *end)
{
	int depth = 0;

	while (p < end) {
		if (*p == '"') {
			if (!(p = skip_string(p, end)))
				return NULL;
			if (depth == 0)
				return p;
			continue;
		}
		if (*p == '{' || *p == '[') {
			depth++;
		} else if (*p == '}' || *p == ']') {
			if (depth == 0)
				return p; /* the end of a scalar that ends its container */
			if (--depth == 0)
				return p + 1;
		} else if (*p == ',' && depth == 0) {
			return p;
		}
		p++;
	}
	return NULL;
}

/* The value of the top-level string field `key` into out; 0 if absent, not a plain string, or too long. */
static int top_level_string(const char *p, const char *end, const char *key, char *out, size_t outsz)
{
	size_t klen = strlen(key);

	p = skip_ws(p, end);
	if (p >= end || *p++ != '{')
		return 0;
	for (;;) {
		const char *k, *q;

		p = skip_ws(p, end);
		if (p >= end || *p != '"')
			return 0;
		k = p + 1;
		if (!(q = skip_string(p, end)))
			return 0;
		p = skip_ws(q, end);
		if (p >= end || *p++ != ':')
			return 0;
		p = skip_ws(p, end);
		if ((size_t)(q - 1 - k) == klen && memcmp(k, key, klen) == 0 && p < end && *p == '"') {
			size_t n = 0;

			for (p++; p < end && *p != '"'; p++) {
				if (*p == '\\') { /* only \" \\ \/ : a path or a version needs no more */
					if (++p >= end || (*p != '"' && *p != '\\' && *p != '/'))
						return 0;
				}
				if (n + 1 >= outsz)
					return 0;
				out[n++] = *p;
			}
			out[n] = 0;
			return p < end;
		}
		if (!(p = skip_value(p, end)))
			return 0;
		p = skip_ws(p, end);
		if (p < end && *p == ',')
			p++;
		else
			return 0;
	}
}

/* ---- the exchange ---- */

static void put_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
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
	put_all(fd, &v, sizeof(v)); /* x86-64 and arm64: already little-endian */
}

int main(void)
{
	static char conf_sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t cap = 1 << 16, len = 0;
	char *in = malloc(cap), *out, **e;
	uint32_t n_env = 0, rc, out_len;
	char asked[16];
	unsigned i;
	int fd;

	signal(SIGPIPE, SIG_IGN);
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
	if (top_level_string(in, in + len, "cniVersion", asked, sizeof(asked)))
		for (i = 0; i < sizeof(supported) / sizeof(supported[0]); i++)
			if (strcmp(asked, supported[i]) == 0)
				strcpy(version, asked);
	if (getenv("BPFLB_CNI_SOCKET") && *getenv("BPFLB_CNI_SOCKET"))
		sock_path = getenv("BPFLB_CNI_SOCKET");
	else if (top_level_string(in, in + len, "agentSocket", conf_sock, sizeof(conf_sock)) && *conf_sock)
		sock_path = conf_sock;
	if (strlen(sock_path) >= sizeof(sa.sun_path))
		fail("socket path", ENAMETOOLONG);
	strcpy(sa.sun_path, sock_path);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
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
	if (!(out = malloc((size_t)out_len + 1)))
		fail("malloc", ENOMEM);
	get_all(fd, out, out_len);
	if (fwrite(out, 1, out_len, stdout) != out_len || fflush(stdout) != 0)
		return 1;
	return (int)rc;
}
