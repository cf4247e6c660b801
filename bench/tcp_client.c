// SPDX-License-Identifier: Apache-2.0
/*
 * Connection-rate client for bench/connect_rate.py (compiled by the script with gcc).
 *
 * One long-lived process reads commands from stdin and answers on stdout, one line each, so the
 * benchmark can interleave short rounds against two targets without paying process start-up:
 *
 *   run <ip>[,<ip>...] <port> <c|r> <count>  -> "<ok> <failed> <first errno> <elapsed ns>"
 *        connection i goes to the (i mod n)-th address of the list, so a client that dials the
 *        backends directly spreads over them as the ClusterIP's random pick does
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

int main(void)
{
	static struct target targets[MAX_TARGETS];
	char line[4096], ip[4000], mode[4];
	int port;
	long count;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while (fgets(line, sizeof(line), stdin)) {
		struct target t;

		if (sscanf(line, "run %3999s %d %3s %ld", ip, &port, mode, &count) == 4) {
			long ok = 0, failed = 0;
			int first = 0, rr = mode[0] == 'r', n, k = 0;
			long long t0, t1;

			if ((n = parse_targets(ip, port, targets)) < 0) {
				printf("error bad address list\n");
				continue;
			}
			t0 = now_ns();
			for (long i = 0; i < count; i++) {
				int err = one(&targets[k], rr, NULL, 0, NULL);

				if (++k == n)
					k = 0;
				if (err) {
					failed++;
					if (!first)
						first = err;
				} else {
					ok++;
				}
			}
			t1 = now_ns();
			printf("%ld %ld %d %lld\n", ok, failed, first, t1 - t0);
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
