/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection-tracking time, shared by sock_lb.c and tc_lb.c: conntrack's UDP timeouts
 * (lb/settings.py ConntrackSettings, passed as -D by the loader) and the one way to age an entry.
 */
#ifndef BPFLB_LB_TIME_H
#define BPFLB_LB_TIME_H

/* A flow that saw no reply, or whose reply came within its first 2 s (a DNS-style exchange), lives
 * UDP_TIMEOUT_NS after its last datagram; one still active after 2 s with replies (a "stream") lives
 * UDP_STREAM_TIMEOUT_NS. As net/netfilter/nf_conntrack_proto_udp.c decides it. */
#ifndef UDP_TIMEOUT_NS
#define UDP_TIMEOUT_NS (30ULL * 1000000000ULL)
#endif
#ifndef UDP_STREAM_TIMEOUT_NS
#define UDP_STREAM_TIMEOUT_NS (120ULL * 1000000000ULL)
#endif
#define UDP_STREAM_AFTER_NS (2ULL * 1000000000ULL)

/*
 * now - then, or 0 if ``then`` is later than ``now``: another CPU may stamp an entry (a reply, the
 * flow's next packet, a new connection of the same client) between our clock read and our look at
 * it. Unsigned, that difference would wrap to ~2^64 and a live entry would look expired.
 */
static __always_inline __u64 age(__u64 now, __u64 then)
{
	return now > then ? now - then : 0;
}

#endif /* BPFLB_LB_TIME_H */
