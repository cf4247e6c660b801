// SPDX-License-Identifier: Apache-2.0
/*
 * Backend server for bench/connect_rate.py (compiled by the script with gcc).
 *
 *   tcp_server <ip>:<port>:<c|r> ...
 *
 * c: accept and close (the sink of "connect+close").
 * r: accept, read the request line, answer "<ip>:<port>\n" of the listening socket, close.
 *
 * Single-threaded: poll on the listeners, then accept until EAGAIN. Prints "ready" once every
 * listener is bound. Both benchmark targets (backend directly, and the ClusterIP that translates
 * to the same backend) end up on the same listener, so the server's cost is the same for both.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_LISTENERS 64

struct listener {
	int fd;
	int rr;
	char ident[96];
	size_t ident_len;
};

static int listen_on(const char *spec, struct listener *l)
{
	char ip[64], mode;
	int port, one = 1;
	const char *last = strrchr(spec, ':'), *prev;
	struct sockaddr_storage ss;
	socklen_t len;

	/* ip may be IPv6 (colons): the port and mode are the last two fields. */
	if (!last || last == spec)
		return -1;
	mode = last[1];
	for (prev = last - 1; prev > spec && *prev != ':'; prev--)
		;
	if (*prev != ':' || (size_t)(prev - spec) >= sizeof(ip))
		return -1;
	memcpy(ip, spec, prev - spec);
	ip[prev - spec] = 0;
	port = atoi(prev + 1);
	memset(&ss, 0, sizeof(ss));
	if (strchr(ip, ':')) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		if (inet_pton(AF_INET6, ip, &s6->sin6_addr) != 1)
			return -1;
		len = sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		if (inet_pton(AF_INET, ip, &s4->sin_addr) != 1)
			return -1;
		len = sizeof(*s4);
	}
	l->fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (l->fd < 0)
		return -1;
	setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(l->fd, (struct sockaddr *)&ss, len) < 0 || listen(l->fd, 4096) < 0)
		return -1;
	l->rr = mode == 'r';
	l->ident_len = snprintf(l->ident, sizeof(l->ident), "%s:%d\n", ip, port);
	return 0;
}

static void serve(struct listener *l, int fd)
{
	char buf[256];

	if (l->rr) {
		/* The request is one short line in one segment; wait for it (bounded). */
		struct timeval tv = { .tv_sec = 1 };
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		if (recv(fd, buf, sizeof(buf), 0) > 0)
			send(fd, l->ident, l->ident_len, MSG_NOSIGNAL);
	}
	close(fd);
}

int main(int argc, char **argv)
{
	struct listener ls[MAX_LISTENERS];
	struct pollfd pfd[MAX_LISTENERS];
	int n = 0;

	if (argc - 1 > MAX_LISTENERS) {
		fprintf(stderr, "tcp_server: at most %d listeners\n", MAX_LISTENERS);
		return 1;
	}
	for (int i = 1; i < argc; i++, n++) {
		if (listen_on(argv[i], &ls[n]) < 0) {
			fprintf(stderr, "tcp_server: cannot listen on %s: %s\n", argv[i], strerror(errno));
			return 1;
		}
		pfd[n].fd = ls[n].fd;
		pfd[n].events = POLLIN;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		if (poll(pfd, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		for (int i = 0; i < n; i++) {
			if (!(pfd[i].revents & POLLIN))
				continue;
			for (;;) {
				/* Accepted sockets are blocking: the request/response read waits for the line. */
				int fd = accept4(ls[i].fd, NULL, NULL, 0);
				if (fd < 0)
					break;
				serve(&ls[i], fd);
			}
		}
	}
}
