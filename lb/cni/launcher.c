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
 * Socket: $BPFLB_CNI_SOCKET, else the configuration's top-level "agentSocket" (an "agentSocket" that is
 * not a plain string is an error, never a silent fall back), else /run/bpflb/cni.sock.
 * Agent unreachable (or gone mid-request, or silent for $BPFLB_CNI_TIMEOUT seconds, default 60): a CNI
 * error on stdout, code 11 "try again later" (50 "plugin not available" for STATUS), in the cniVersion
 * the configuration asked for, and exit status 1. Except DEL: the request is queued in
 * <socket dir>/del-queue/ (written, then renamed to <time>-<pid>.del) for the agent to do when it
 * starts, and DEL succeeds, so a pod never sticks in Terminating (as Cilium's plugin does).
 * The agent's answer is passed through: its stdout, and its exit code as the exit status (a code that
 * does not fit in an exit status becomes 1, never 0).
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef DEFAULT_SOCKET /* lb/cni/install.py passes settings.CNI_SOCKET_DEFAULT */
#define DEFAULT_SOCKET "/run/bpflb/cni.sock"
#endif
#define E_INVALID_CONFIG 7
#define E_TRY_AGAIN 11
#define E_NOT_AVAILABLE 50
#define MAX_BYTES (16u << 20) /* the configuration, or the answer (lb/cni/server.py MAX_BYTES) */
#define DEFAULT_TIMEOUT 60    /* seconds without progress from the agent */

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

static void error_exit(int code, const char *msg)
{
	printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":", version, code);
	put_json_string(msg);
	printf("}\n");
	fflush(stdout);
	fprintf(stderr, "bpflb-cni: %s\n", msg);
	exit(1);
}

static void fail(const char *what, int err)
{
	const char *cmd = getenv("CNI_COMMAND");
	int code = (cmd && strcmp(cmd, "STATUS") == 0) ? E_NOT_AVAILABLE : E_TRY_AGAIN;
	char msg[512 + sizeof(((struct sockaddr_un *)0)->sun_path)];

	snprintf(msg, sizeof(msg), "bpflb agent not reachable at %s: %s: %s", sock_path, what, strerror(err));
	error_exit(code, msg);
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

/* The value of the top-level string field `key` into out: 1; 0 if absent (or the JSON is malformed:
 * the agent reports that); -1 if present but not a plain string that fits. */
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
		if ((size_t)(q - 1 - k) == klen && memcmp(k, key, klen) == 0) {
			size_t n = 0;

			if (p >= end || *p != '"')
				return -1;
			for (p++; p < end && *p != '"'; p++) {
				if (*p == '\\') { /* only \" \\ \/ : a path or a version needs no more */
					if (++p >= end || (*p != '"' && *p != '\\' && *p != '/'))
						return -1;
				}
				if (n + 1 >= outsz || *p == 0)
					return -1;
				out[n++] = *p;
			}
			out[n] = 0;
			return p < end ? 1 : -1;
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

/* ---- the request, built in memory: sent to the agent, or queued for it ---- */

static char *req;
static size_t req_len, req_cap;

static void add(const void *p, size_t n)
{
	if (req_len + n > req_cap) {
		while (req_len + n > req_cap)
			req_cap = req_cap ? req_cap * 2 : 1 << 16;
		if (!(req = realloc(req, req_cap)))
			fail("realloc", ENOMEM);
	}
	memcpy(req + req_len, p, n);
	req_len += n;
}

static void add_u32(uint32_t v)
{
	add(&v, sizeof(v)); /* x86-64 and arm64: already little-endian */
}

/* DEL with no agent: queue the request for it, written whole and then renamed. 0, or an errno. */
static int queue_del(void)
{
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path) + 16], tmp[sizeof(dir) + 64], name[sizeof(dir) + 64];
	const char *slash = strrchr(sock_path, '/');
	struct timespec now;
	size_t off = 0;
	int fd, err;

	if (slash)
		snprintf(dir, sizeof(dir), "%.*s/del-queue", (int)(slash - sock_path), sock_path);
	else
		snprintf(dir, sizeof(dir), "del-queue");
	clock_gettime(CLOCK_REALTIME, &now);
	snprintf(tmp, sizeof(tmp), "%s/.tmp-%ld", dir, (long)getpid());
	snprintf(name, sizeof(name), "%s/%020lld.%09ld-%ld.del", dir, (long long)now.tv_sec, now.tv_nsec,
		 (long)getpid());
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return errno;
	while (off < req_len) {
		ssize_t n = write(fd, req + off, req_len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			err = errno;
			close(fd);
			unlink(tmp);
			return err;
		}
		off += (size_t)n;
	}
	if (close(fd) < 0 || rename(tmp, name) < 0) {
		err = errno;
		unlink(tmp);
		return err;
	}
	return 0;
}

/* The agent did not answer: DEL is queued (success), anything else fails. */
static void unreachable(const char *what, int err)
{
	const char *cmd = getenv("CNI_COMMAND");

	if (cmd && strcmp(cmd, "DEL") == 0 && queue_del() == 0) {
		fprintf(stderr, "bpflb-cni: agent not reachable at %s (%s: %s): DEL queued for it\n", sock_path,
			what, strerror(err));
		exit(0);
	}
	fail(what, err);
}

/* 0, or the errno that stopped the write (the agent may have answered without reading it all: a refusal) */
static int put_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return errno == EAGAIN ? ETIMEDOUT : errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int write_error;

static void get_all(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			fail("read", ETIMEDOUT); /* the agent has the request: it may be working on it */
		if (n <= 0 && write_error)
			unreachable("write", write_error);
		if (n <= 0)
			unreachable("read", n == 0 ? ECONNRESET : errno);
		p += n;
		len -= (size_t)n;
	}
}

int main(void)
{
	static char conf_sock[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t cap = 1 << 16, len = 0;
	char *in = malloc(cap), *out, **e;
	uint32_t n_env = 0, rc, out_len;
	struct timeval tv = { .tv_sec = DEFAULT_TIMEOUT };
	const char *t = getenv("BPFLB_CNI_TIMEOUT");
	char asked[16];
	unsigned i;
	int fd, found;

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
		if (len > MAX_BYTES)
			error_exit(E_INVALID_CONFIG, "bpflb-cni: the network configuration is over 16 MiB");
		if (len == cap && !(in = realloc(in, cap *= 2)))
			fail("realloc", ENOMEM);
	}
	if (top_level_string(in, in + len, "cniVersion", asked, sizeof(asked)) == 1)
		for (i = 0; i < sizeof(supported) / sizeof(supported[0]); i++)
			if (strcmp(asked, supported[i]) == 0)
				strcpy(version, asked);
	found = top_level_string(in, in + len, "agentSocket", conf_sock, sizeof(conf_sock));
	if (getenv("BPFLB_CNI_SOCKET") && *getenv("BPFLB_CNI_SOCKET"))
		sock_path = getenv("BPFLB_CNI_SOCKET");
	else if (found < 0 || (found == 1 && !*conf_sock))
		error_exit(E_INVALID_CONFIG, "bpflb-cni: agentSocket must be a non-empty string (a socket path of "
					     "at most 107 bytes, no escapes but \\\" \\\\ \\/)");
	else if (found == 1)
		sock_path = conf_sock;
	if (strlen(sock_path) >= sizeof(sa.sun_path))
		fail("socket path", ENAMETOOLONG);
	strcpy(sa.sun_path, sock_path);
	if (t && *t && atoi(t) > 0)
		tv.tv_sec = atoi(t);

	for (e = environ; *e; e++)
		if (strncmp(*e, "CNI_", 4) == 0)
			n_env++;
	add_u32(n_env);
	for (e = environ; *e; e++) {
		if (strncmp(*e, "CNI_", 4) != 0)
			continue;
		add_u32((uint32_t)strlen(*e));
		add(*e, strlen(*e));
	}
	add_u32((uint32_t)len);
	add(in, len);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		fail("socket", errno);
	if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
		fail("setsockopt", errno);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		if (errno == ENOENT || errno == ECONNREFUSED)
			unreachable("connect", errno);
		fail("connect", errno);
	}
	write_error = put_all(fd, req, req_len);
	if (write_error == ETIMEDOUT)
		unreachable("write", write_error);
	get_all(fd, &rc, sizeof(rc));
	get_all(fd, &out_len, sizeof(out_len));
	if (out_len > MAX_BYTES)
		fail("read", EMSGSIZE);
	if (!(out = malloc((size_t)out_len + 1)))
		fail("malloc", ENOMEM);
	get_all(fd, out, out_len);
	if (fwrite(out, 1, out_len, stdout) != out_len || fflush(stdout) != 0)
		return 1;
	return rc <= 255 ? (int)rc : 1;
}
