// SPDX-License-Identifier: Apache-2.0
/*
 * Connection-rate client for bench/connect_rate.py (compiled by the script with gcc).
 *
 * One long-lived process reads commands from stdin and answers on stdout, one line each, so the
 * benchmark can interleave short rounds against two targets without paying process start-up:
 *
 *   run <ip>[,<ip>...] <port> <c|r> <count> [<procs>]  -> "<ok> <failed> <first errno> <elapsed ns>"
 *        connection i goes to the (i mod n)-th address of the list, so a client that dials the
 *        backends directly spreads over them as the ClusterIP's random pick does;
 *        procs > 1: that many processes (forked before the clock starts, released together) each
 *        make count/procs connections one after another, the elapsed time running until the last
 *        is done: the rate a node sustains with several connections in flight, not one at a time
 *        c: socket, connect, close                       ("connect+close")
 *        r: socket, connect, send "hi\n", read the reply, close   ("request/response")
 *   check <ip> <port> <c|r>        -> "<reply or -> <peer ip>:<peer port>"  (one connection, as run)
 *   quit
 *
 * Every socket is closed with SO_LINGER {1, 0} (an abortive close, RST): no TIME_WAIT is left on
 * either side, so the ephemeral port range never runs out and the kernel's port search stays
 * cheap; it is the same for both targets. Timing is CLOCK_MONOTONIC around the loop only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct target {
	struct sockaddr_storage sa;
	socklen_t len;
	int family;
};

static int parse_target(const char *ip, int port, struct target *t)
{
	memset(t, 0, sizeof(*t));
	if (strchr(ip, ':')) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&t->sa;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		if (inet_pton(AF_INET6, ip, &s6->sin6_addr) != 1)
			return -1;
		t->len = sizeof(*s6);
		t->family = AF_INET6;
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&t->sa;
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		if (inet_pton(AF_INET, ip, &s4->sin_addr) != 1)
			return -1;
		t->len = sizeof(*s4);
		t->family = AF_INET;
	}
	return 0;
}

#define MAX_TARGETS 64

/* "ip,ip,..." -> targets[]; returns how many, or -1. */
static int parse_targets(char *list, int port, struct target *t)
{
	int n = 0;

	for (char *ip = strtok(list, ","); ip; ip = strtok(NULL, ",")) {
		if (n == MAX_TARGETS || parse_target(ip, port, &t[n]) < 0)
			return -1;
		n++;
	}
	return n ? n : -1;
}

static const struct linger abortive = { .l_onoff = 1, .l_linger = 0 };
static const char request[] = "hi\n";

/* One connection. Returns 0 or an errno; *reply (if given) receives the reply text. */
static int one(const struct target *t, int rr, char *reply, size_t reply_len, int *fd_out)
{
	char buf[128];
	int err = 0;
	int fd = socket(t->family, SOCK_STREAM, 0);

	if (fd < 0)
		return errno;
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
	if (connect(fd, (const struct sockaddr *)&t->sa, t->len) < 0) {
		err = errno;
		goto out;
	}
	if (rr) {
		ssize_t n, got = 0;
		if (send(fd, request, sizeof(request) - 1, 0) != (ssize_t)(sizeof(request) - 1)) {
			err = errno ? errno : EIO;
			goto out;
		}
		/* The reply is one short line; the server closes after it. */
		while ((n = recv(fd, buf + got, sizeof(buf) - 1 - got, 0)) > 0) {
			got += n;
			if (memchr(buf, '\n', got) || got == (ssize_t)sizeof(buf) - 1)
				break;
		}
		if (n < 0) {
			err = errno;
			goto out;
		}
		if (got == 0) {
			err = ECONNRESET;
			goto out;
		}
		if (reply) {
			buf[got] = 0;
			snprintf(reply, reply_len, "%.*s", (int)strcspn(buf, "\n"), buf);
		}
	}
out:
	if (fd_out && !err) {
		*fd_out = fd;
		return 0;
	}
	close(fd);
	return err;
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* count connections one after another, from the k-th target on; *first gets the first errno */
static void loop(const struct target *targets, int n, int k, int rr, long count, long *ok, long *failed, int *first)
{
	for (long i = 0; i < count; i++) {
		int err = one(&targets[k], rr, NULL, 0, NULL);

		if (++k == n)
			k = 0;
		if (err) {
			(*failed)++;
			if (!*first)
				*first = err;
		} else {
			(*ok)++;
		}
	}
}

/* procs processes, count/procs connections each (the first ones take the remainder), released at
 * once through a pipe; results come back through another. 0, or -1 (fork/pipe failed). */
static int parallel(const struct target *targets, int n, int rr, long count, int procs, long *ok, long *failed,
		    int *first, long long *ns)
{
	int go[2], res[2];
	struct { long ok, failed; int first; } r;

	if (pipe(go) < 0 || pipe(res) < 0)
		return -1;
	for (int j = 0; j < procs; j++) {
		pid_t pid = fork();

		if (pid < 0)
			return -1;
		if (pid == 0) {
			char c;

			close(go[1]);
			close(res[0]);
			if (read(go[0], &c, 1) < 0)
				_exit(1);
			memset(&r, 0, sizeof(r));
			loop(targets, n, j % n, rr, count / procs + (j < count % procs), &r.ok, &r.failed, &r.first);
			if (write(res[1], &r, sizeof(r)) != sizeof(r))
				_exit(1);
			_exit(0);
		}
	}
	close(go[0]);
	close(res[1]);
	long long t0 = now_ns();
	close(go[1]); /* every child's read returns: go */
	for (int j = 0; j < procs; j++) {
		if (read(res[0], &r, sizeof(r)) != sizeof(r)) {
			close(res[0]);
			return -1;
		}
		*ok += r.ok;
		*failed += r.failed;
		if (!*first)
			*first = r.first;
	}
	*ns = now_ns() - t0;
	close(res[0]);
	while (wait(NULL) > 0)
		;
	return 0;
}

int main(void)
{
	static struct target targets[MAX_TARGETS];
	char line[4096], ip[4000], mode[4];
	int port;
	long count;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		struct target t;

		int procs = 1;

		if (sscanf(line, "run %3999s %d %3s %ld %d", ip, &port, mode, &count, &procs) >= 4) {
			long ok = 0, failed = 0;
			int first = 0, rr = mode[0] == 'r', n;
			long long t0, ns;

			if ((n = parse_targets(ip, port, targets)) < 0 || procs < 1 || procs > 64) {
				printf("error bad address list or process count\n");
				continue;
			}
			if (procs > 1) {
				if (parallel(targets, n, rr, count, procs, &ok, &failed, &first, &ns) < 0) {
					printf("error %s\n", strerror(errno));
					continue;
				}
			} else {
				t0 = now_ns();
				loop(targets, n, 0, rr, count, &ok, &failed, &first);
				ns = now_ns() - t0;
			}
			printf("%ld %ld %d %lld\n", ok, failed, first, ns);
		} else if (sscanf(line, "check %63s %d %3s", ip, &port, mode) == 3) {
			char reply[128] = "-", peer[INET6_ADDRSTRLEN] = "?";
			struct sockaddr_storage ps;
			socklen_t pl = sizeof(ps);
			int fd = -1, err;

			if (parse_target(ip, port, &t) < 0) {
				printf("error bad address %s\n", ip);
				continue;
			}
			err = one(&t, mode[0] == 'r', reply, sizeof(reply), &fd);
			if (err) {
				printf("error %s\n", strerror(err));
				continue;
			}
			/* getpeername goes through the datapath's reverse translation. */
			if (getpeername(fd, (struct sockaddr *)&ps, &pl) == 0) {
				if (ps.ss_family == AF_INET) {
					struct sockaddr_in *s4 = (struct sockaddr_in *)&ps;
					inet_ntop(AF_INET, &s4->sin_addr, peer, sizeof(peer));
					port = ntohs(s4->sin_port);
				} else {
					struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ps;
					inet_ntop(AF_INET6, &s6->sin6_addr, peer, sizeof(peer));
					port = ntohs(s6->sin6_port);
				}
			}
			close(fd);
			printf("%s %s:%d\n", reply, peer, port);
		} else if (strncmp(line, "quit", 4) == 0) {
			break;
		} else {
			printf("error unknown command\n");
		}
	}
	return 0;
}
