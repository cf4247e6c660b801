// SPDX-License-Identifier: GPL-2.0
/*
 * North-south load balancing: tc programs for traffic arriving at the node from outside.
 *
 * bpflb_tc_ext   tcx ingress of each external device (--devices). A packet to an EXTERNAL frontend
 *                (an LB ingress IP or ExternalIP, or a node address lb_node_addrs marks on a NodePort,
 *                which finds the wildcard frontend) picks a backend from the same master/slot maps as
 *                the socket programs, is DNATed (and masqueraded under LB_SVC_F_SNAT) and leaves at once:
 *                into the local pod (lb_endpoints: its host veth's ifindex, its MAC; bpf_redirect_peer
 *                puts the packet on the ingress of the pod's end of the pair) or, for a remote backend, to the
 *                next hop bpf_fib_lookup names (pod network, overlay or direct; out of a veth whose peer
 *                is in another namespace, such as a container node's eth0, by bpf_redirect_peer:
 *                redirect_out()). lb_ct remembers the
 *                flow, so its later packets take the same backend; lb_nat remembers the reply tuple.
 *                Replies of masqueraded flows to remote backends come back here (to the node address
 *                and the masquerade port) and are reverse-translated before the stack sees them.
 * bpflb_tc_pod   tcx ingress of a local pod's host veth (what the pod sends): replies of translated
 *                flows are reverse-translated here, before anything else on the node sees them, and sent
 *                out towards the client. No egress program is needed: every reply is caught at the
 *                ingress of the device it arrives on, and a reply must never reach the stack untranslated
 *                (its source may be a node address, which the stack drops as a martian).
 *
 * Not translated, passed on to the stack as they are (documented in docs, see also lb/datapath.py):
 *  - IPv6 packets with extension headers (fragments among them: no ports to match). IPv4 fragments are
 *    translated (lb_frags, see parse()); a later fragment that overtakes its first is the stack's.
 * ICMP errors about a translated flow (port unreachable from a backend with nothing on the port,
 * fragmentation needed / packet too big, time exceeded) are translated as conntrack translates a RELATED
 * packet: from the backend's side (tc_pod, or tc_ext for a remote backend) the outer header becomes
 * frontend -> client and the quoted packet client -> frontend; from the client's side (tc_ext) the outer
 * header becomes masquerade address (or client) -> backend and the quote backend -> that address. See
 * icmp_error().
 * Rules as kube-proxy nftables applies them: no endpoints at all -> reject (ICMP port unreachable, as
 * nft "reject" does: the client's connect fails at once with ECONNREFUSED); LB_SVC_F_DROP_EMPTY
 * (externalTrafficPolicy Local, none here) -> silent drop; LB_SVC_F_SRC_RANGES -> the client must be in
 * lb_src_ranges for the frontend, else drop.
 *
 * Masquerade ports (lb_nat) come from NAT_PORT_MIN..NAT_PORT_MAX, outside the kernel's ephemeral range
 * (ip_local_port_range 32768-60999 by default) and the NodePort range (30000-32767), so the kernel never
 * picks one for a local connection; a candidate is skipped if it is a NodePort frontend, if a local
 * socket (listener or connection) owns the reply tuple, or if another flow holds it (insert NOEXIST).
 *
 * Loaded by lb/datapath.py with the same -D flags as sock_lb.c (shared maps, lb_maps.h).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/pkt_cls.h>
#include "lb_maps.h"
#include "lb_time.h"

/* kube-proxy sets nf_conntrack_tcp_timeout_established to 86400 s; after a FIN or RST, 10 s. */
#define TCP_TIMEOUT_NS (86400ULL * 1000000000ULL)
#define TCP_CLOSE_TIMEOUT_NS (10ULL * 1000000000ULL)

#ifndef NAT_PORT_MIN
#define NAT_PORT_MIN 61000
#endif
#ifndef NAT_PORT_MAX
#define NAT_PORT_MAX 65535
#endif
#define NAT_TRIES 16
/* A masquerade port whose flow closed (FIN or RST) goes to a new flow no sooner than this after the
 * close: the old flow's last segments (its RST, say, handled on another CPU) may still be on their way
 * to the backend, and a new SYN on the same tuple overtaking them meets the old socket there (a
 * FIN_WAIT2 socket answers it with a RST: the client sees ECONNREFUSED). Among the ports tried, the one
 * closed longest ago is taken. */
#ifndef NAT_REUSE_AFTER_NS
#define NAT_REUSE_AFTER_NS (10ULL * 1000000ULL)
#endif
/* A closed flow's port is taken at once, without trying further ports, once it closed this long ago. */
#define NAT_REUSE_AT_ONCE_NS (100ULL * 1000000ULL)
/* Entries' last_ns is refreshed at most this often (a flow's timeouts are many seconds). */
#define CT_REFRESH_NS (1000000000ULL)

/* bcc's declaration predates the params argument (kernel 5.10 has 4). */
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#define AF_INET 2
#define AF_INET6 10
#define ETH_HLEN_ 14
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

struct pkt {
	struct lb_ct_tuple t;   /* as the packet is now (updated by each rewrite) */
	__u32 l4;               /* offset of the L4 header (the IP header is at ETH_HLEN_) */
	__u8 v6;
	__u8 tcp_flags;
	__u8 frag;              /* IPv4: FRAG_FIRST (ports here) or FRAG_LATER (ports from lb_frags), else 0 */
};

#define FRAG_FIRST 1
#define FRAG_LATER 2

/*
 * IPv4 fragments of a datagram to or from a translated flow, as conntrack serves them after its defrag:
 * the first fragment (offset 0, MF) carries the L4 header; parse() remembers its ports by (source,
 * destination, IP ID, protocol), and a later fragment (no L4 header) takes them from there, so it finds
 * its flow and is translated with it (addresses only: its bytes are payload; the L4 checksum, in the
 * first fragment, covers the whole datagram and is updated there). A later fragment that arrives before
 * the first is left to the stack. IPv6 fragments (an extension header) are not handled.
 */
struct frag_key {
	__u32 saddr, daddr;
	__u16 id;
	__u8 proto;
	__u8 pad;
};
struct frag_ports {
	__u16 sport, dport;
};
BPF_TABLE("lru_hash", struct frag_key, struct frag_ports, lb_frags, 4096);

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

/* Parse Ethernet + IPv4/IPv6 + TCP/UDP. 0 if the packet is one we may translate, 1 for ICMP (ICMPv6). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 l4;

	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->ihl != 5)
			return -1; /* IP options: not translated */
		p->t.proto = ip->protocol;
		p->t.saddr[2] = bpf_htonl(0xffff);
		p->t.daddr[2] = bpf_htonl(0xffff);
		p->t.saddr[3] = ip->saddr;
		p->t.daddr[3] = ip->daddr;
		l4 = ETH_HLEN_ + sizeof(*ip);
		if (ip->frag_off & bpf_htons(0x3fff)) {
			struct frag_key fk = { .saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .proto = ip->protocol };

			if (p->t.proto != IPPROTO_TCP && p->t.proto != IPPROTO_UDP)
				return -1;
			if (ip->frag_off & bpf_htons(0x1fff)) {
				/* a later fragment: the ports its first fragment had */
				struct frag_ports *fp = lb_frags.lookup(&fk);

				if (!fp)
					return -1; /* (first fragment not seen: the stack's) */
				p->t.sport = fp->sport;
				p->t.dport = fp->dport;
				p->l4 = l4;
				p->frag = FRAG_LATER;
				return 0;
			}
			/* the first fragment: its ports, for the later ones */
			__u16 *ports = data + l4;
			if ((void *)(ports + 2) > end)
				return -1;
			struct frag_ports fp = { .sport = ports[0], .dport = ports[1] };
			lb_frags.update(&fk, &fp);
			p->frag = FRAG_FIRST;
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return -1;
		p->v6 = 1;
		p->t.proto = ip6->nexthdr; /* an extension header (fragment, ...) is not TCP/UDP: left alone */
		__builtin_memcpy(p->t.saddr, ip6->saddr.in6_u.u6_addr32, 16);
		__builtin_memcpy(p->t.daddr, ip6->daddr.in6_u.u6_addr32, 16);
		l4 = ETH_HLEN_ + sizeof(*ip6);
	} else {
		return -1;
	}
	p->l4 = l4;
	if (p->t.proto == IPPROTO_TCP) {
		struct tcphdr *th = data + l4;

		if ((void *)(th + 1) > end)
			return -1;
		p->t.sport = th->source;
		p->t.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		return 0;
	}
	if (p->t.proto == IPPROTO_UDP) {
		struct udphdr *uh = data + l4;

		if ((void *)(uh + 1) > end)
			return -1;
		p->t.sport = uh->source;
		p->t.dport = uh->dest;
		return 0;
	}
	if (p->t.proto == (p->v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP))
		return 1; /* maybe an error about a translated flow: icmp_error() */
	return -1;
}

/* ---- rewriting, with the L3/L4 checksums kept right ---------------------------------------------- */

static __always_inline __u32 csum_off(const struct pkt *p)
{
	return p->l4 + (p->t.proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
}

/* Ones' complement sum of two 32-bit words (end-around carry), as csum_add does. */
static __always_inline __u32 csum_add(__u32 a, __u32 b)
{
	a += b;
	return a + (a < b);
}

static __always_inline __u16 csum_fold32(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/*
 * Rewrite the packet's addresses and ports to saddr:sport -> daddr:dport (either pair may equal what
 * the packet carries), with the L3/L4 checksums kept right, in as few helper calls as the kernel lets us:
 * the checksum differences are summed here (one for the addresses, one for the ports), the L4
 * checksum takes them in two bpf_l4_csum_replace calls (the addresses as a pseudo-header change, which
 * is all a CHECKSUM_PARTIAL packet's field may take: its ports are summed by whoever finishes it), and
 * the header fields (and the IPv4 header checksum, which nothing offloads) are written directly.
 * IPv4 UDP without a checksum (0) keeps it 0. The packet is forwarded: its TTL (hop limit) drops by one,
 * as the stack's forwarding would; one that arrives with 1 or 0 is dropped (the stack would also answer
 * ICMP time exceeded, which is not sent here). 0 or -1.
 */
static __always_inline int xlate(struct __sk_buff *skb, struct pkt *p, const __u32 *saddr, __u16 sport,
				 const __u32 *daddr, __u16 dport)
{
	__u32 coff = csum_off(p);
	__u64 mangled = (p->t.proto == IPPROTO_UDP && !p->v6) ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 ns[4], nd[4];
	__u32 ad = 0, pd = 0;

	__builtin_memcpy(ns, saddr, 16);
	__builtin_memcpy(nd, daddr, 16);
	if (p->v6) {
#pragma unroll
		for (int i = 0; i < 4; i++) {
			ad = csum_add(ad, ~p->t.saddr[i]);
			ad = csum_add(ad, ns[i]);
			ad = csum_add(ad, ~p->t.daddr[i]);
			ad = csum_add(ad, nd[i]);
		}
	} else {
		ad = csum_add(csum_add(~p->t.saddr[3], ns[3]), csum_add(~p->t.daddr[3], nd[3]));
	}
	int ports = p->t.sport != sport || p->t.dport != dport;
	if (ports)
		pd = csum_add(csum_add(~(__u32)p->t.sport & 0xffff, sport), csum_add(~(__u32)p->t.dport & 0xffff, dport));
	/* a later fragment has no L4 header: its addresses only (the first fragment's checksum took the rest) */
	if (ad && p->frag != FRAG_LATER && bpf_l4_csum_replace(skb, coff, 0, ad, BPF_F_PSEUDO_HDR | mangled) < 0)
		return -1;
	if (pd && p->frag != FRAG_LATER && bpf_l4_csum_replace(skb, coff, 0, pd, mangled) < 0)
		return -1;

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	/* (parse() put L4 right after a fixed-size IP header: a constant offset for the verifier) */
	__u16 *l4 = data + (p->v6 ? ETH_HLEN_ + sizeof(struct ipv6hdr) : ETH_HLEN_ + sizeof(struct iphdr));

	if ((void *)(l4 + 2) > end)
		return -1;
	if (p->v6) {
		struct ipv6hdr *ip6 = data + ETH_HLEN_;

		if ((void *)(ip6 + 1) > end)
			return -1;
		if (ip6->hop_limit <= 1)
			return -1;
		ip6->hop_limit--; /* forwarded, as the stack's ip6_forward would */
		__builtin_memcpy(ip6->saddr.in6_u.u6_addr32, ns, 16);
		__builtin_memcpy(ip6->daddr.in6_u.u6_addr32, nd, 16);
	} else {
		struct iphdr *ip = data + ETH_HLEN_;

		if ((void *)(ip + 1) > end)
			return -1;
		if (ip->ttl <= 1)
			return -1;
		/* forwarded, as the stack's ip_forward would: TTL - 1, in the header checksum with the addresses
		 * (TTL shares a 16-bit word with the protocol; the L4 pseudo-header has neither). */
		__u16 *ttl_word = (__u16 *)&ip->ttl;
		__u32 td = ~(__u32)*ttl_word & 0xffff;
		ip->ttl--;
		td = csum_add(td, *ttl_word);
		ip->saddr = ns[3];
		ip->daddr = nd[3];
		/* csum_replace_by_diff: fold(~check + diff), complemented. */
		ip->check = ~csum_fold32(csum_add(~(__u32)ip->check & 0xffff, csum_add(ad, td)));
	}
	if (p->frag != FRAG_LATER) {
		l4[0] = sport;
		l4[1] = dport;
	}
	__builtin_memcpy(p->t.saddr, ns, 16);
	__builtin_memcpy(p->t.daddr, nd, 16);
	p->t.sport = sport;
	p->t.dport = dport;
	return 0;
}

/* Set the packet's destination and source MACs. 0 or -1. */
static __always_inline int set_macs(struct __sk_buff *skb, const __u8 *dmac, const __u8 *smac)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return -1;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	if (smac)
		__builtin_memcpy(eth->h_source, smac, 6);
	return 0;
}

/* Out of device ifindex, the packet complete (MACs set): into its peer's ingress when it is a veth
 * whose peer is in another namespace (lb_dev_addrs: LB_DEV_F_PEER), which is where the device's
 * transmit would put it, one backlog queue pass later; else through the device's transmit. Only from
 * tc ingress (both programs run there): the kernel drops a peer redirect from anywhere else. */
static __always_inline int redirect_out(__u32 ifindex)
{
	struct lb_dev_addr *da = lb_dev_addrs_v1.lookup(&ifindex);

	if (da && (da->flags & LB_DEV_F_PEER))
		return bpf_redirect_peer(ifindex, 0);
	return bpf_redirect(ifindex, 0);
}

/*
 * Send the (rewritten) packet to its next hop without the stack: bpf_fib_lookup from the device it
 * arrived on, MACs rewritten, redirected out of the device the route names; when the neighbour is
 * not resolved yet, bpf_redirect_neigh resolves it. ``fallback`` is the device to try when the FIB
 * has no answer (0: drop).
 *
 * tot_len stays 0: the helper then checks the skb itself against the egress MTU (is_skb_forwardable),
 * which passes a GSO packet whose segments fit. A GRO/TSO superpacket (a bulk transfer's data, up to
 * 64 KB in one skb) carries its whole length in the IP header; given as tot_len, the FIB would answer
 * FRAG_NEEDED for every one of them and only MTU-sized segments would get through.
 * A non-GSO packet larger than the egress MTU still gets FRAG_NEEDED and is dropped (no ICMP back:
 * PMTU discovery across the node relies on the MSS, see the top of this file).
 */
static __always_inline int redirect_fib_in(struct __sk_buff *skb, const struct pkt *p, __u32 fallback,
					   struct bpf_fib_lookup *fib)
{
	int rc;

	__builtin_memset(fib, 0, sizeof(*fib));
	fib->ifindex = skb->ifindex;
	fib->l4_protocol = p->t.proto;
	fib->sport = p->t.sport;
	fib->dport = p->t.dport;
	if (p->v6) {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, p->t.saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, p->t.daddr, 16);
	} else {
		fib->family = AF_INET;
		fib->ipv4_src = p->t.saddr[3];
		fib->ipv4_dst = p->t.daddr[3];
	}
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (set_macs(skb, fib->dmac, fib->smac) < 0)
			return TC_ACT_SHOT;
		return redirect_out(fib->ifindex);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return redirect_neigh(fib->ifindex, 0, 0, 0);
	if (fallback)
		return redirect_neigh(fallback, 0, 0, 0);
	return TC_ACT_SHOT;
}

static __always_inline int redirect_fib(struct __sk_buff *skb, const struct pkt *p, __u32 fallback)
{
	struct bpf_fib_lookup fib;

	return redirect_fib_in(skb, p, fallback, &fib);
}

/* ---- conntrack ------------------------------------------------------------------------------------ */

/*
 * An lb_nat entry changes hands under a try-lock of its own: the 64-bit word {flags, gen, rev_nat_id}
 * (BPF's atomics are 64-bit here). A program that rewrites an entry (a flow taking its port, a flow's
 * close or first reply marking it, a delete) reads the word first (nat_word_of), then what it decides
 * by, then takes the word from that value to an odd gen (nat_lock: one compare-and-swap); that fails if
 * anything changed the entry since, or if another program holds it, and the entry is then left alone.
 * The holder writes and releases with the new flags and the next even gen (nat_unlock). Without it two
 * CPUs could both take over one dead port for two new flows at once (found by bench/nodeport.py with
 * several clients at a time: one of the two flows never got a reply, its SYNs retried until the client
 * gave up), and a flow's close could land in the entry after another flow had taken it. Translating a
 * reply only reads the entry.
 */
static __always_inline __u64 *nat_word(struct lb_nat_val *v)
{
	return (__u64 *)&v->flags; /* flags, gen, rev_nat_id (little-endian: flags in the low 16 bits) */
}

/* A lock word, read before anything a decision is taken by: the barrier keeps the compiler from moving
 * the entry's other loads above it (x86 does not reorder loads with loads). */
static __always_inline __u64 word_of(__u64 *word)
{
	__u64 w = *(volatile __u64 *)word;

	asm volatile("" ::: "memory");
	return w;
}

static __always_inline __u64 nat_word_of(struct lb_nat_val *v)
{
	return word_of(nat_word(v));
}

_Static_assert(__builtin_offsetof(struct lb_nat_val, flags) % 8 == 0 &&
	       __builtin_offsetof(struct lb_nat_val, rev_nat_id) == __builtin_offsetof(struct lb_nat_val, flags) + 4,
	       "lb_nat_val: flags, gen, rev_nat_id are one aligned 64-bit word");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "nat_word: flags are the low 16 bits");
#define NAT_GEN_ONE (1ULL << 16)
#define NAT_GEN_MASK 0xffff0000ULL
#define NAT_LOCK_TRIES 4 /* a hold lasts a few stores: a try that meets one reads the word again */

/* Take *v, whose word was ``seen`` when the caller read what it decides by. 1 if taken. */
static __always_inline int nat_lock(struct lb_nat_val *v, __u64 seen)
{
	if (seen & NAT_GEN_ONE)
		return 0; /* another holds it */
	return __sync_val_compare_and_swap(nat_word(v), seen, seen + NAT_GEN_ONE) == seen;
}

/* Release *v, whose word the holder left as ``held``, with flags and the next even gen. If the word is
 * not ``held`` any more, the element is not the holder's (the LRU or an update replaced it): left as is. */
static __always_inline void nat_release(struct lb_nat_val *v, __u64 held, __u16 flags)
{
	__sync_val_compare_and_swap(nat_word(v), held, (held & ~0xffffffffULL) | ((held + NAT_GEN_ONE) & NAT_GEN_MASK) | flags);
}

/* Release *v, taken with ``seen`` and not rewritten, with flags. */
static __always_inline void nat_unlock(struct lb_nat_val *v, __u64 seen, __u16 flags)
{
	nat_release(v, seen + NAT_GEN_ONE, flags);
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Is the lb_nat entry *o the reply side of the flow whose client tuple is *t? (A reply tuple is the
 * flow's only while it holds the port: another flow may have taken it over since.) */
static __always_inline int nat_of(const struct lb_nat_val *o, const struct lb_ct_tuple *t)
{
	return addr_eq(o->client, t->saddr) && o->client_port == t->sport && addr_eq(o->frontend, t->daddr) &&
	       o->frontend_port == t->dport;
}

/* Take the entry *o if it is still the flow *t's (checked after each read of its word: another flow may
 * take it meanwhile; t 0: whoever's it is, for a reply's mark). The word is read again after a try that
 * met another holder. 1 (and *seen) if taken. */
static __always_inline int nat_take_own(struct lb_nat_val *o, const struct lb_ct_tuple *t, __u64 *seen)
{
#pragma unroll
	for (int i = 0; i < NAT_LOCK_TRIES; i++) {
		__u64 w = nat_word_of(o);

		if (t && !nat_of(o, t))
			return 0;
		if (nat_lock(o, w)) {
			*seen = w;
			return 1;
		}
	}
	return 0;
}

/* Write *nv over the entry *o the caller holds (taken with ``seen``), and release it. */
static __always_inline void nat_rewrite(struct lb_nat_val *o, __u64 seen, struct lb_nat_val *nv)
{
	__u64 held = ((__u64)nv->rev_nat_id << 32) | ((seen + NAT_GEN_ONE) & NAT_GEN_MASK) | nv->flags;

	nv->gen = (seen + NAT_GEN_ONE) >> 16; /* the copy keeps the entry held */
	__builtin_memcpy(o, nv, sizeof(*nv));
	nat_release(o, held, nv->flags);
	nv->gen = 0;
}

/* lb_ct_val.flags, set without losing another CPU's bits: an atomic OR on the aligned 64-bit word the
 * flags end (ifindex_out, slot, flags: flags the top 16 bits). */
_Static_assert(__builtin_offsetof(struct lb_ct_val, flags) == 54 && __builtin_offsetof(struct lb_ct_val, ifindex_out) == 48,
	       "lb_ct_val: ifindex_out, slot, flags are one aligned 64-bit word");
static __always_inline __u64 *ct_word(struct lb_ct_val *ct)
{
	return (__u64 *)&ct->ifindex_out;
}

static __always_inline void ct_flags_or(struct lb_ct_val *ct, __u16 add)
{
	__sync_fetch_and_or(ct_word(ct), (__u64)add << 48);
}

static __always_inline int ct_live(__u8 proto, __u16 flags, __u64 created, __u64 last, __u64 now)
{
	__u64 timeout;

	if (flags & LB_CT_F_ENDED)
		return 0;
	if (proto == IPPROTO_TCP)
		timeout = (flags & LB_CT_F_CLOSING) ? TCP_CLOSE_TIMEOUT_NS : TCP_TIMEOUT_NS;
	else if ((flags & LB_CT_F_REPLIED) && age(last, created) > UDP_STREAM_AFTER_NS)
		timeout = UDP_STREAM_TIMEOUT_NS;
	else
		timeout = UDP_TIMEOUT_NS;
	return age(now, last) <= timeout;
}

/* The reply tuple of a flow: backend -> the masquerade address and port, or -> the client. */
static __always_inline void reply_tuple(struct lb_ct_tuple *r, const struct lb_ct_tuple *orig, const struct lb_ct_val *ct)
{
	__builtin_memcpy(r->saddr, ct->backend, 16);
	r->sport = ct->backend_port;
	if (ct->flags & LB_CT_F_SNAT) {
		__builtin_memcpy(r->daddr, ct->nat_addr, 16);
		r->dport = ct->nat_port;
	} else {
		__builtin_memcpy(r->daddr, orig->saddr, 16);
		r->dport = orig->sport;
	}
	r->proto = orig->proto;
}

static __always_inline void wildcard(__u32 *addr, int v6)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = v6 ? 0 : bpf_htonl(0xffff);
	addr[3] = 0;
}

/* Does backend_id still sit in slot ``slot`` of the flow's frontend (the same frontend: its rev_nat_id)?
 * The agent keeps a surviving backend in its slot, so a flow keeps its backend through a backend-set
 * change until it is removed. Only the slot is read, not the master: the agent trims the slots past a
 * shrunk frontend's count right after writing the master, and deletes a removed frontend's slots right
 * after its master, so a slot past the count outlives it only for the moment between two map writes. */
static __always_inline int ct_backend_holds(const struct pkt *p, const struct lb_ct_val *ct)
{
	struct lb_svc_key key = {};
	struct lb_svc_val *s;

	if (ct->slot == 0)
		return 0;
	if (ct->flags & LB_CT_F_NODEPORT)
		wildcard(key.addr, p->v6);
	else
		__builtin_memcpy(key.addr, p->t.daddr, 16);
	key.dport = p->t.dport;
	key.proto = p->t.proto;
	key.scope = LB_SCOPE_EXTERNAL;
	key.slot = ct->slot;
	s = lb_services_v1.lookup(&key);
	return s && s->backend_id == ct->backend_id && s->rev_nat_id == ct->rev_nat_id;
}

/* DNAT (and SNAT) a client's packet by its flow's entry, and send it to the backend. */
static __always_inline int forward(struct __sk_buff *skb, struct pkt *p, const struct lb_ct_val *ct)
{
	const __u32 *saddr = p->t.saddr;
	__u16 sport = p->t.sport;

	if (ct->flags & LB_CT_F_SNAT) {
		saddr = ct->nat_addr;
		sport = ct->nat_port;
	}
	if (xlate(skb, p, saddr, sport, ct->backend, ct->backend_port) < 0)
		return TC_ACT_SHOT;
	if (ct->flags & LB_CT_F_LOCAL) {
		/* Straight into the pod: its MAC from lb_endpoints, and into the ingress of the pod's end of
		 * its veth pair (bpf_redirect_peer: no pass through the host veth's transmit and the backlog
		 * queue; the program runs at tcx ingress, where the helper is allowed). */
		if (set_macs(skb, ct->mac, 0) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect_peer(ct->ifindex_out, 0);
	}
	return redirect_fib(skb, p, 0);
}

/* A TCP FIN or RST: the flow is closing. */
static __always_inline int closes(const struct pkt *p)
{
	return p->t.proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST));
}

/* The flags a closing packet adds to its flow's entries. */
static __always_inline __u16 closing_flags(const struct pkt *p)
{
	return LB_CT_F_CLOSING | ((p->tcp_flags & TCP_FLAG_RST) ? LB_CT_F_RST : 0);
}

/* A backend's reply to a translated flow: source back to the frontend, destination back to the client.
 * The flow's entries are written only when something changes: its first reply (REPLIED), a FIN or RST
 * (CLOSING, and the time the flow closed, which masquerade-port reuse goes by), or when their stamp is
 * older than CT_REFRESH_NS; not on every packet (a write per packet makes the entries' cache lines
 * travel between the CPUs handling the two directions). */
static __always_inline int reply(struct __sk_buff *skb, struct pkt *p, struct lb_nat_val *nv)
{
	__u64 now = bpf_ktime_get_boot_ns();
	struct lb_ct_tuple orig = {};
	struct lb_ct_val *ct;
	__u64 seen = nat_word_of(nv);
	__u32 ifindex_in = nv->ifindex_in;
	__u16 nflags = seen & 0xffff;
	int fin = closes(p);

	__builtin_memcpy(orig.saddr, nv->client, 16);
	__builtin_memcpy(orig.daddr, nv->frontend, 16);
	orig.sport = nv->client_port;
	orig.dport = nv->frontend_port;
	orig.proto = p->t.proto;
	if (fin || !(nflags & LB_CT_F_REPLIED) || age(now, nv->last_ns) > CT_REFRESH_NS) {
		__u16 add = LB_CT_F_REPLIED | (fin ? closing_flags(p) : 0);

		__u64 held;
		if (nat_take_own(nv, 0, &held)) { /* (else it is being rewritten over and over: the next reply marks it) */
			nv->last_ns = now;
			nat_unlock(nv, held, (held & 0xffff) | add);
		}
		ct = lb_ct_v1.lookup(&orig);
		if (ct) {
			/* a reply refreshes the flow, as it does a conntrack entry */
			ct_flags_or(ct, add);
			ct->last_ns = now;
		}
	}
	if (xlate(skb, p, orig.daddr, orig.dport, orig.saddr, orig.sport) < 0)
		return TC_ACT_SHOT;
	return redirect_fib(skb, p, ifindex_in);
}

/* ---- reject: what nft "reject" sends for a Service without endpoints ---------------------------- */

static __always_inline __u16 csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

static __always_inline int swap_macs(struct __sk_buff *skb)
{
	__u8 mac[12];

	if (bpf_skb_load_bytes(skb, 0, mac, 12) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, 0, mac + 6, 6, 0) < 0 || bpf_skb_store_bytes(skb, 6, mac, 6, 0) < 0)
		return -1;
	return 0;
}

/*
 * The offending packet may carry an offloaded, not yet computed L4 checksum: a sender on this host (a
 * veth or tap peer with tx checksum offload, as the test beds' clients) hands it over CHECKSUM_PARTIAL,
 * the field holding only the pseudo-header sum and csum_start/csum_offset telling a device where to
 * finish it. The kernel keeps that state through these rewrites and refuses to trim the packet short of
 * the field (bpf_skb_change_tail: -EINVAL; the reject was dropped and the client timed out). So the quote
 * keeps the whole L4 header (TCP 20 bytes, UDP 8: the field included), and the field is set to the value
 * a device finishing the checksum writes back over it (the range it sums is the quoted L4 header, the
 * field included): the ICMP checksum then holds whether the L4 checksum is finished on the way (a device
 * without checksum offload) or left as it is (a receiver trusts a CHECKSUM_PARTIAL packet unverified).
 * On a packet with its checksum complete the field is just part of the quote.
 */
static __always_inline void quote_l4_csum(__u8 *l4, __u32 l4len, __u32 field)
{
	__u32 s;

	l4[field] = 0;
	l4[field + 1] = 0;
	s = (__u32)bpf_csum_diff(0, 0, (__be32 *)l4, l4len, 0);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	/* F with F == ~(s + F) in ones' complement: 2F == -s (mod 0xffff), and 2 * 0x8000 == 1 (mod 0xffff).
	 * Byte order does not matter: a byte swap is a multiplication by 0x100 (mod 0xffff). */
	__u16 f = (__u16)(((0xffff - s) * 0x8000) % 0xffff);
	__builtin_memcpy(l4 + field, &f, 2);
}

/* ICMP port unreachable quoting the IP header and the L4 header (l4len bytes) of the offending packet,
 * sent back out of the device it came in on, from the frontend address. */
static __always_inline int reject4(struct __sk_buff *skb, __u32 l4len, __u32 field)
{
	struct {
		struct iphdr ip;
		struct icmphdr icmp;
		__u8 quote[sizeof(struct iphdr) + sizeof(struct tcphdr)];
	} __attribute__((packed)) m = {};
	__u32 qlen = sizeof(struct iphdr) + l4len;
	__u32 len = sizeof(m.ip) + sizeof(m.icmp) + qlen;

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, m.quote, qlen) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + qlen, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_adjust_room(skb, sizeof(m.ip) + sizeof(m.icmp), BPF_ADJ_ROOM_MAC, 0) < 0)
		return TC_ACT_SHOT;
	quote_l4_csum(m.quote + sizeof(struct iphdr), l4len, field);
	struct iphdr *q = (struct iphdr *)m.quote;
	m.ip.version = 4;
	m.ip.ihl = 5;
	m.ip.tot_len = bpf_htons(len);
	m.ip.ttl = 64;
	m.ip.protocol = IPPROTO_ICMP;
	m.ip.saddr = q->daddr;
	m.ip.daddr = q->saddr;
	m.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&m.ip, sizeof(m.ip), 0));
	m.icmp.type = ICMP_DEST_UNREACH;
	m.icmp.code = ICMP_PORT_UNREACH;
	m.icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&m.icmp, sizeof(m.icmp) + qlen, 0));
	if (bpf_skb_store_bytes(skb, ETH_HLEN_, &m, len, 0) < 0 || swap_macs(skb) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int reject6(struct __sk_buff *skb, __u32 l4len, __u32 field)
{
	struct {
		struct ipv6hdr ip;
		struct icmp6hdr icmp;
		__u8 quote[sizeof(struct ipv6hdr) + sizeof(struct tcphdr)];
	} __attribute__((packed)) m = {};
	struct {
		__u32 len;
		__u32 nexthdr;
	} pseudo = {};
	__u32 qlen = sizeof(struct ipv6hdr) + l4len;
	__u32 len = sizeof(m.ip) + sizeof(m.icmp) + qlen;

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, m.quote, qlen) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + qlen, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_adjust_room(skb, sizeof(m.ip) + sizeof(m.icmp), BPF_ADJ_ROOM_MAC, 0) < 0)
		return TC_ACT_SHOT;
	quote_l4_csum(m.quote + sizeof(struct ipv6hdr), l4len, field);
	struct ipv6hdr *q = (struct ipv6hdr *)m.quote;
	m.ip.version = 6;
	m.ip.payload_len = bpf_htons(sizeof(m.icmp) + qlen);
	m.ip.nexthdr = IPPROTO_ICMPV6;
	m.ip.hop_limit = 64;
	m.ip.saddr = q->daddr;
	m.ip.daddr = q->saddr;
	m.icmp.icmp6_type = ICMPV6_DEST_UNREACH;
	m.icmp.icmp6_code = ICMPV6_PORT_UNREACH;
	pseudo.len = bpf_htonl(sizeof(m.icmp) + qlen);
	pseudo.nexthdr = bpf_htonl(IPPROTO_ICMPV6);
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&m.ip.saddr, 32, 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&pseudo, sizeof(pseudo), sum);
	sum = bpf_csum_diff(0, 0, (__be32 *)&m.icmp, sizeof(m.icmp) + qlen, sum);
	m.icmp.icmp6_cksum = csum_fold(sum);
	if (bpf_skb_store_bytes(skb, ETH_HLEN_, &m, len, 0) < 0 || swap_macs(skb) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* What nft "reject" sends for a TCP or UDP packet (parse() passes no other protocol). */
static __always_inline int reject(struct __sk_buff *skb, const struct pkt *p)
{
	if (p->t.proto == IPPROTO_TCP)
		return p->v6 ? reject6(skb, sizeof(struct tcphdr), offsetof(struct tcphdr, check))
			     : reject4(skb, sizeof(struct tcphdr), offsetof(struct tcphdr, check));
	return p->v6 ? reject6(skb, sizeof(struct udphdr), offsetof(struct udphdr, check))
		     : reject4(skb, sizeof(struct udphdr), offsetof(struct udphdr, check));
}

/* ---- ICMP errors about a translated flow ---------------------------------------------------------- */

/* Offsets in an ICMP error (parse() admits only a fixed-size outer header): its header, the quoted IP
 * header, the quoted L4 header. */
#define ICMP4_OFF (ETH_HLEN_ + sizeof(struct iphdr))
#define ICMP4_QUOTE (ICMP4_OFF + 8)
#define ICMP4_QUOTE_L4 (ICMP4_QUOTE + sizeof(struct iphdr))
#define ICMP6_OFF (ETH_HLEN_ + sizeof(struct ipv6hdr))
#define ICMP6_QUOTE (ICMP6_OFF + 8)
#define ICMP6_QUOTE_L4 (ICMP6_QUOTE + sizeof(struct ipv6hdr))

/* Is this ICMP (ICMPv6) packet an error quoting a TCP or UDP packet? *q gets the quoted packet's tuple.
 * The errors conntrack relates to a flow: destination unreachable (fragmentation needed among them),
 * time exceeded, parameter problem; ICMPv6 also packet too big. 0 or -1. */
static __always_inline int icmp_quote(struct __sk_buff *skb, const struct pkt *p, struct lb_ct_tuple *q,
				      struct ipv6hdr *buf)
{
	__u16 ports[2];
	__u8 type;

	if (bpf_skb_load_bytes(skb, p->v6 ? ICMP6_OFF : ICMP4_OFF, &type, 1) < 0)
		return -1;
	if (p->v6) {
		struct ipv6hdr *in = buf;

		if (type != ICMPV6_DEST_UNREACH && type != ICMPV6_PKT_TOOBIG && type != ICMPV6_TIME_EXCEED &&
		    type != ICMPV6_PARAMPROB)
			return -1;
		if (bpf_skb_load_bytes(skb, ICMP6_QUOTE, in, sizeof(*in)) < 0)
			return -1;
		q->proto = in->nexthdr;
		__builtin_memcpy(q->saddr, in->saddr.in6_u.u6_addr32, 16);
		__builtin_memcpy(q->daddr, in->daddr.in6_u.u6_addr32, 16);
		if (bpf_skb_load_bytes(skb, ICMP6_QUOTE_L4, ports, 4) < 0)
			return -1;
	} else {
		struct iphdr *in = (struct iphdr *)buf;

		if (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED && type != ICMP_PARAMETERPROB)
			return -1;
		if (bpf_skb_load_bytes(skb, ICMP4_QUOTE, in, sizeof(*in)) < 0)
			return -1;
		if (in->ihl != 5 || (in->frag_off & bpf_htons(0x1fff)))
			return -1; /* options, or not the first fragment: no ports quoted */
		q->proto = in->protocol;
		q->saddr[2] = bpf_htonl(0xffff);
		q->daddr[2] = bpf_htonl(0xffff);
		q->saddr[3] = in->saddr;
		q->daddr[3] = in->daddr;
		if (bpf_skb_load_bytes(skb, ICMP4_QUOTE_L4, ports, 4) < 0)
			return -1;
	}
	if (q->proto != IPPROTO_TCP && q->proto != IPPROTO_UDP)
		return -1;
	q->sport = ports[0];
	q->dport = ports[1];
	return 0;
}

/* The new addresses and ports of an ICMP error: outer header os -> od, quoted packet qs:qsport -> qd:qdport. */
struct icmp_xlate_to {
	__u32 qs[4], qd[4], os[4], od[4]; /* in header order: bpf_csum_diff takes each pair at once */
	__u16 qsport, qdport;
	__u8 qproto;
};

/*
 * Rewrite an ICMP error to *to, every checksum covering what changes kept right: the quoted IPv4
 * header's, the quoted L4 checksum (UDP's is always quoted, TCP's when the quote reaches it; the quote's
 * pseudo-header and ports changed), the ICMP checksum (it covers the quote; ICMPv6's also the outer
 * addresses), the outer IPv4 header's. TTL (hop limit) - 1, as forwarding would; 1 or 0 is dropped.
 * The fields are written directly: ICMP is never checksum-offloaded. 0 or -1.
 */
static __always_inline int icmp_xlate(struct __sk_buff *skb, struct pkt *p, const struct icmp_xlate_to *to)
{
	__u32 want = (p->v6 ? ICMP6_QUOTE_L4 : ICMP4_QUOTE_L4) + sizeof(struct tcphdr);

	if (want > skb->len)
		want = skb->len;
	if (bpf_skb_pull_data(skb, want) < 0)
		return -1;
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 qa, qp, icd, oa;
	__u16 *l4, *l4c = 0, *icsum;

	if (p->v6) {
		struct ipv6hdr *ip = data + ETH_HLEN_;
		struct icmp6hdr *ic = data + ICMP6_OFF;
		struct ipv6hdr *in = data + ICMP6_QUOTE;

		l4 = data + ICMP6_QUOTE_L4;
		if ((void *)(l4 + 4) > end)
			return -1;
		if (ip->hop_limit <= 1)
			return -1;
		/* saddr and daddr are adjacent in both the header and *to (qs, qd; os, od) */
		qa = (__u32)bpf_csum_diff((__be32 *)in->saddr.in6_u.u6_addr32, 32, (__be32 *)to->qs, 32, 0);
		oa = (__u32)bpf_csum_diff((__be32 *)ip->saddr.in6_u.u6_addr32, 32, (__be32 *)to->os, 32, 0);
		icd = oa; /* ICMPv6's checksum covers the outer addresses (pseudo-header) */
		__builtin_memcpy(in->saddr.in6_u.u6_addr32, to->qs, 16);
		__builtin_memcpy(in->daddr.in6_u.u6_addr32, to->qd, 16);
		ip->hop_limit--;
		__builtin_memcpy(ip->saddr.in6_u.u6_addr32, to->os, 16);
		__builtin_memcpy(ip->daddr.in6_u.u6_addr32, to->od, 16);
		icsum = &ic->icmp6_cksum;
	} else {
		struct iphdr *ip = data + ETH_HLEN_;
		struct icmphdr *ic = data + ICMP4_OFF;
		struct iphdr *in = data + ICMP4_QUOTE;

		l4 = data + ICMP4_QUOTE_L4;
		if ((void *)(l4 + 4) > end)
			return -1;
		if (ip->ttl <= 1)
			return -1;
		qa = csum_add(csum_add(~in->saddr, to->qs[3]), csum_add(~in->daddr, to->qd[3]));
		__u16 old = in->check;
		in->check = ~csum_fold32(csum_add(~(__u32)old & 0xffff, qa));
		icd = csum_add(~(__u32)old & 0xffff, in->check); /* the quoted header's checksum is quoted too */
		in->saddr = to->qs[3];
		in->daddr = to->qd[3];
		oa = csum_add(csum_add(~ip->saddr, to->os[3]), csum_add(~ip->daddr, to->od[3]));
		__u16 *ttl_word = (__u16 *)&ip->ttl;
		__u32 td = ~(__u32)*ttl_word & 0xffff;
		ip->ttl--;
		td = csum_add(td, *ttl_word);
		ip->saddr = to->os[3];
		ip->daddr = to->od[3];
		ip->check = ~csum_fold32(csum_add(~(__u32)ip->check & 0xffff, csum_add(oa, td)));
		icsum = &ic->checksum;
	}
	qp = csum_add(csum_add(~(__u32)l4[0] & 0xffff, to->qsport), csum_add(~(__u32)l4[1] & 0xffff, to->qdport));
	/* the quoted L4 checksum: UDP's at byte 6 (0: none, IPv4 only), TCP's at byte 16 if quoted */
	if (to->qproto == IPPROTO_UDP)
		l4c = &l4[3];
	else if ((void *)(l4 + 9) <= end)
		l4c = &l4[8];
	if (l4c && (*l4c || p->v6)) {
		__u16 old = *l4c;
		__u16 n = ~csum_fold32(csum_add(~(__u32)old & 0xffff, csum_add(qa, qp)));

		if (n == 0 && to->qproto == IPPROTO_UDP)
			n = 0xffff;
		*l4c = n;
		icd = csum_add(icd, csum_add(~(__u32)old & 0xffff, n));
	}
	l4[0] = to->qsport;
	l4[1] = to->qdport;
	icd = csum_add(icd, csum_add(qa, qp));
	*icsum = ~csum_fold32(csum_add(~(__u32)*icsum & 0xffff, icd));
	__builtin_memcpy(p->t.saddr, to->os, 16);
	__builtin_memcpy(p->t.daddr, to->od, 16);
	p->t.sport = 0;
	p->t.dport = 0;
	return 0;
}

/* ---- a new flow ------------------------------------------------------------------------------------ */

/* A local socket owns the reply tuple (a listener on the port, or a connection with that peer)? */
static __always_inline int port_owned_locally(struct __sk_buff *skb, const struct lb_ct_tuple *r, int v6)
{
	struct bpf_sock_tuple st = {};
	struct bpf_sock *sk;
	__u32 len;

	if (v6) {
		__builtin_memcpy(st.ipv6.saddr, r->saddr, 16);
		__builtin_memcpy(st.ipv6.daddr, r->daddr, 16);
		st.ipv6.sport = r->sport;
		st.ipv6.dport = r->dport;
		len = sizeof(st.ipv6);
	} else {
		st.ipv4.saddr = r->saddr[3];
		st.ipv4.daddr = r->daddr[3];
		st.ipv4.sport = r->sport;
		st.ipv4.dport = r->dport;
		len = sizeof(st.ipv4);
	}
	if (r->proto == IPPROTO_TCP)
		sk = bpf_skc_lookup_tcp(skb, &st, len, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(skb, &st, len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/*
 * May a new flow take the masquerade port of the flow *old holds (reply tuple *r)? As conntrack lets a
 * new connection take a NAT tuple whose old connection is over (nf_nat_used_tuple_harder: TCP CLOSE or
 * TIME_WAIT, for a SYN): the old flow has expired, or its client-side entry is gone or names another
 * port (it was replaced), or it is a TCP flow that saw a FIN or RST and the new packet is a SYN. Nothing
 * else removes an lb_nat entry (the map is LRU, the agent does not sweep it): without this, a sustained
 * connection rate filled the 4536 ports of a backend with dead flows within seconds, and new flows to
 * that backend failed. The old flow's client-side entry is removed with it, so a late packet of the
 * old connection starts a flow of its own instead of reaching the backend on the new flow's port.
 */
/* Per-CPU room for new_flow's larger locals: inlined into bpflb_tc_ext, they pushed its stack past the
 * 512 bytes BPF allows. */
struct new_flow_scratch {
	struct bpf_fib_lookup fib;
	struct lb_ct_tuple orig; /* nat_reclaim's lookup key */
	struct lb_nat_val nv;
	struct lb_ct_val ct;     /* the new flow's entry */
	struct lb_ct_tuple r;    /* its reply tuple */
};
BPF_PERCPU_ARRAY(new_flow_scratch, struct new_flow_scratch, 1);

/* Remove the reply tuple *r if it is still the flow *t's (taken first: not after another flow took it). */
static __always_inline void nat_delete_own(struct lb_ct_tuple *r, const struct lb_ct_tuple *t)
{
	__u64 seen;
	struct lb_nat_val *o = lb_nat_v1.lookup(r);

	if (o && nat_take_own(o, t, &seen))
		lb_nat_v1.delete(r);
}

/* Mark the lb_ct entry *ct ended if it is still the flow that held the port *r names (created at
 * ``created``): a compare-and-swap on its flags' word, so a new flow rewriting the entry meanwhile is
 * never marked, and a close marking it meanwhile is kept (the word is read again). */
static __always_inline void ct_end(struct lb_ct_val *ct, __u64 created, const struct lb_ct_tuple *r)
{
#pragma unroll
	for (int i = 0; i < NAT_LOCK_TRIES; i++) {
		__u64 w = word_of(ct_word(ct));

		if (ct->created_ns != created || ct->nat_port != r->dport || !addr_eq(ct->nat_addr, r->daddr) ||
		    !addr_eq(ct->backend, r->saddr) || ct->backend_port != r->sport)
			return; /* rewritten since: another flow's entry now */
		if (__sync_val_compare_and_swap(ct_word(ct), w, w | ((__u64)LB_CT_F_ENDED << 48)) == w)
			return;
	}
}

static __always_inline int nat_reclaim(const struct lb_ct_tuple *r, const struct lb_nat_val *old, int syn, __u64 now,
				       struct lb_ct_tuple *orig, struct lb_ct_val **ends, __u64 *ends_created)
{
	struct lb_ct_val *ct;
	__u64 closed = old->last_ns;

	__builtin_memcpy(orig->saddr, old->client, 16);
	__builtin_memcpy(orig->daddr, old->frontend, 16);
	orig->sport = old->client_port;
	orig->dport = old->frontend_port;
	orig->proto = r->proto;
	ct = lb_ct_v1.lookup(orig);
	if (ct && (ct->flags & LB_CT_F_SNAT) && ct->nat_port == r->dport && addr_eq(ct->nat_addr, r->daddr) &&
	    addr_eq(ct->backend, r->saddr) && ct->backend_port == r->sport) {
		int closing = (ct->flags | old->flags) & LB_CT_F_CLOSING;

		if (ct->last_ns > closed)
			closed = ct->last_ns;
		if (ct_live(r->proto, ct->flags, ct->created_ns, ct->last_ns, now) &&
		    !(syn && r->proto == IPPROTO_TCP && closing && age(now, closed) >= NAT_REUSE_AFTER_NS))
			return 0;
		/* The port may go to a new flow: this one then ends (*ends: nat_claim marks it once it holds
		 * the port). Its entry stays where it is, ended (never live again: a later packet on its tuple
		 * is a new flow, as after a delete), for the next flow on its tuple to rewrite in place
		 * (new_flow_in) instead of an LRU insert. */
		*ends = ct;
		*ends_created = ct->created_ns;
		return 1;
	}
	/* No client-side entry for this port any more: only replies in flight still use it. */
	return (syn && age(now, closed) >= NAT_REUSE_AFTER_NS) || !ct_live(r->proto, old->flags, closed, closed, now);
}

/* *npk as port_usable needs it: the external wildcard frontend key of r's protocol (its port set there). */
static __always_inline void nodeport_key(struct lb_svc_key *npk, __u8 proto, int v6)
{
	__builtin_memset(npk, 0, sizeof(*npk));
	wildcard(npk->addr, v6);
	npk->proto = proto;
	npk->scope = LB_SCOPE_EXTERNAL;
}

/* May a new flow's reply tuple *r use its port: not a NodePort frontend, no local socket on it? */
static __always_inline int port_usable(struct __sk_buff *skb, const struct lb_ct_tuple *r, struct lb_svc_key *npk,
				       int v6)
{
	npk->dport = r->dport;
	if (lb_services_v1.lookup(npk))
		return 0; /* a NodePort (outside the default range, but the range is the cluster's choice) */
	return !port_owned_locally(skb, r, v6);
}

/* Claim a masquerade port for the reply tuple *r (daddr = the masquerade address): writes r->dport
 * and the lb_nat entry. A free port is taken at once, and so is the first port tried whose flow closed
 * at least NAT_REUSE_AT_ONCE_NS ago: it is as good as free (a sustained connection rate keeps every port
 * held by closed flows, the datapath frees none; waiting for half the tries to prefer a free port cost
 * a SYN eight lookups where two do, bench/nodeport.py --bpf-stats: 1.6 -> 1.15 us per external packet);
 * when every try is held, the port of the flow among them that closed longest ago is taken over, if its
 * flow is over (nat_reclaim), else the last one tried, if its flow is over. 0, or -1.
 * A takeover holds the entry (nat_lock): of two CPUs taking over the same dead port in the same
 * instant one gets it, the other's packet is dropped (its retransmission claims another port). */
static __always_inline int nat_claim(struct __sk_buff *skb, struct lb_ct_tuple *r, struct lb_nat_val *nv, int v6,
				     int syn, __u64 now, struct lb_svc_key *scratch, struct new_flow_scratch *sc)
{
	/* scratch: the caller's lb_svc_key, done with (bpflb_tc_ext's stack is near its 512 bytes);
	 * sc: the caller's per-CPU scratch (its nv is *nv: only .orig is used here). */
	struct lb_svc_key *npk = scratch;
	struct lb_ct_tuple *orig = &sc->orig;
	__u16 taken = 0, best = 0;
	__u64 best_age = 0;

	nodeport_key(npk, r->proto, v6);
#pragma unroll
	for (int i = 0; i < NAT_TRIES; i++) {
		__u16 port = NAT_PORT_MIN + bpf_get_prandom_u32() % (NAT_PORT_MAX - NAT_PORT_MIN + 1);
		struct lb_nat_val *o;

		r->dport = bpf_htons(port);
		o = lb_nat_v1.lookup(r);
		if (o) {
			__u64 a = age(now, o->last_ns);

			taken = r->dport;
			if ((o->flags & LB_CT_F_CLOSING) && (!best || a > best_age)) {
				best = r->dport;
				best_age = a;
				if (a >= NAT_REUSE_AT_ONCE_NS)
					break; /* closed long enough ago: as good as free, no need to look further */
			}
			continue;
		}
		if (!port_usable(skb, r, npk, v6))
			continue;
		if (lb_nat_v1.insert(r, nv) == 0)
			return 0;
		taken = r->dport; /* another CPU took it in the meantime */
	}
	if (best && best_age >= NAT_REUSE_AFTER_NS)
		taken = best;
	if (!taken)
		return -1;
	r->dport = taken;
	struct lb_nat_val *old = lb_nat_v1.lookup(r);
	if (!old)
		return -1;
	__u64 seen = nat_word_of(old);
	struct lb_ct_val *ends = 0;
	__u64 ends_created = 0;
	if (!nat_reclaim(r, old, syn, now, orig, &ends, &ends_created) || !port_usable(skb, r, npk, v6) ||
	    !nat_lock(old, seen))
		return -1; /* (lost to another CPU: the SYN is dropped, as conntrack drops a TCP packet whose
			    * NAT tuple clashed at confirm; its retransmission claims another port) */
	/* The port is ours: its old flow ends, and the same reply tuple is rewritten where it is. */
	if (ends)
		ct_end(ends, ends_created, r);
	nat_rewrite(old, seen, nv);
	return 0;
}

static __always_inline struct lb_svc_val *frontend_of(struct pkt *p, struct lb_svc_key *key, __u16 *ct_flags)
{
	struct lb_svc_val *svc;
	struct lb_node_addr *na;

	__builtin_memcpy(key->addr, p->t.daddr, 16);
	key->dport = p->t.dport;
	key->proto = p->t.proto;
	key->scope = LB_SCOPE_EXTERNAL;
	svc = lb_services_v1.lookup(key);
	if (svc)
		return svc;
	na = lb_node_addrs_v1.lookup((struct lb_node_addr_key *)p->t.daddr);
	if (!na || !(na->flags & LB_NODE_ADDR_F_NODEPORT))
		return 0;
	wildcard(key->addr, p->v6);
	*ct_flags |= LB_CT_F_NODEPORT;
	return lb_services_v1.lookup(key);
}

static __always_inline struct lb_backend *pick(struct lb_svc_key *key, __u16 count, __u32 *backend_id, __u16 *slot)
{
	struct lb_svc_val *s;

	key->slot = (bpf_get_prandom_u32() % count) + 1;
	*slot = key->slot;
	s = lb_services_v1.lookup(key);
	if (!s)
		return 0;
	*backend_id = s->backend_id;
	return lb_backends_v1.lookup(backend_id);
}

/* A new flow, or one on the tuple of a flow that ended (prev: that flow's lb_ct entry, else 0).
 * The backend is picked anew either way, as kube-proxy's conntrack does: a SYN on a closed or aborted
 * tuple kills the old entry and makes a new one with its own NAT decision (nf_conntrack_proto_tcp's
 * tcp_packet, "Attempt to reopen a closed/aborted connection"). The masquerade port is where bpflb
 * differs on purpose: kube-proxy's is random (masquerade fully-random); here a flow that picks prev's
 * backend and masquerade address takes prev's port back when prev ended with an RST (LB_CT_F_RST:
 * neither end keeps a socket for the tuple, so the backend sees a fresh connection from a port it has
 * no state for, exactly as with a random one) and the port is still prev's and usable. Both entries
 * are then rewritten where they are: a client that reuses its ports under a sustained connection rate
 * (every one does, within seconds) costs no LRU allocation and no port search. After a graceful close
 * the backend may hold the tuple in TIME_WAIT, so a new port is claimed, as before. Otherwise prev's
 * reply tuple is removed (if it is still prev's). */
static __always_inline int new_flow_in(struct __sk_buff *skb, struct pkt *p, __u64 now, struct lb_ct_val *prev,
				       int *prev_done)
{
	struct lb_svc_key key = {};
	struct lb_svc_val *svc;
	struct lb_backend *be = 0;
	__u16 ct_flags = 0;
	__u32 backend_id = 0;
	__u16 slot = 0;

	svc = frontend_of(p, &key, &ct_flags);
	if (!svc)
		return TC_ACT_OK; /* not a frontend: the stack's */
	__u16 count = svc->count;
	__u16 flags = svc->flags;
	__u32 rev_nat_id = svc->rev_nat_id;
	__u32 affinity_timeout = svc->affinity_timeout;

	if (flags & LB_SVC_F_SRC_RANGES) {
		struct lb_src_range_key rk = { .prefixlen = 32 + 128, .rev_nat_id = rev_nat_id };

		__builtin_memcpy(rk.addr, p->t.saddr, 16);
		if (!lb_src_ranges_v1.lookup(&rk))
			return TC_ACT_SHOT; /* outside loadBalancerSourceRanges: dropped, as kube-proxy's firewall */
	}
	if (count == 0) {
		if (flags & LB_SVC_F_DROP_EMPTY)
			return TC_ACT_SHOT;
		return reject(skb, p);
	}

	struct lb_ext_affinity_key ak = {};
	if (flags & LB_SVC_F_AFFINITY) {
		__builtin_memcpy(ak.client, p->t.saddr, 16);
		ak.rev_nat_id = rev_nat_id;
		struct lb_affinity_val *av = lb_ext_affinity_v1.lookup(&ak);
		if (av && age(now, av->last_used_ns) <= (__u64)affinity_timeout * 1000000000ULL && av->slot > 0 &&
		    av->slot <= count) {
			key.slot = av->slot;
			struct lb_svc_val *s = lb_services_v1.lookup(&key);
			if (s && s->backend_id == av->backend_id) {
				backend_id = av->backend_id;
				slot = av->slot;
				be = lb_backends_v1.lookup(&backend_id);
			}
		}
	}
	if (!be) {
		be = pick(&key, count, &backend_id, &slot);
		if (!be) {
			/* The agent shrank the frontend between our two reads: read the master again. */
			key.slot = 0;
			svc = lb_services_v1.lookup(&key);
			if (!svc || svc->count == 0)
				return TC_ACT_SHOT;
			be = pick(&key, svc->count, &backend_id, &slot);
			if (!be)
				return TC_ACT_SHOT;
		}
	}
	if (is_v4_mapped(be->addr) == p->v6)
		return TC_ACT_SHOT; /* another family: the agent programs none (no NAT46/64) */
	if (flags & LB_SVC_F_AFFINITY) {
		struct lb_affinity_val av = { .backend_id = backend_id, .slot = slot, .last_used_ns = now };
		lb_ext_affinity_v1.update(&ak, &av);
	}

	/* the flow's entry and reply tuple are built in per-CPU scratch (bpflb_tc_ext's stack is near its
	 * 512 bytes) */
	__u32 zero = 0;
	struct new_flow_scratch *sc = new_flow_scratch.lookup(&zero);
	if (!sc)
		return TC_ACT_SHOT;
	struct lb_ct_val *ct = &sc->ct;
	struct lb_ct_tuple *r = &sc->r;

	__builtin_memset(ct, 0, sizeof(*ct));
	__builtin_memset(r, 0, sizeof(*r));
	ct->flags = ct_flags;
	__builtin_memcpy(ct->backend, be->addr, 16);
	ct->backend_port = be->port;
	ct->backend_id = backend_id;
	ct->rev_nat_id = rev_nat_id;
	ct->slot = slot;
	ct->ifindex_in = skb->ifindex;
	ct->created_ns = now;
	ct->last_ns = now;

	struct lb_endpoint *ep = lb_endpoints_v1.lookup((struct lb_endpoint_key *)be->addr);
	__u32 out_dev = skb->ifindex;
	if (ep) {
		ct->flags |= LB_CT_F_LOCAL;
		ct->ifindex_out = ep->ifindex;
		__builtin_memcpy(ct->mac, ep->mac, 6);
	} else if (flags & LB_SVC_F_SNAT) {
		/* The device the backend is reached through decides the masquerade address. */
		struct bpf_fib_lookup *fib = &sc->fib;
		__builtin_memset(fib, 0, sizeof(*fib));
		fib->ifindex = skb->ifindex;
		if (p->v6) {
			fib->family = AF_INET6;
			__builtin_memcpy(fib->ipv6_src, p->t.saddr, 16);
			__builtin_memcpy(fib->ipv6_dst, be->addr, 16);
		} else {
			fib->family = AF_INET;
			fib->ipv4_src = p->t.saddr[3];
			fib->ipv4_dst = be->addr[3];
		}
		int rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
		if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
			out_dev = fib->ifindex;
	}

	/* prev's reply tuple (sc->orig: nat_claim uses it only after this is done with) */
	struct lb_ct_tuple *old = &sc->orig;
	__builtin_memset(old, 0, sizeof(*old));
	if (prev)
		reply_tuple(old, &p->t, prev);

	struct lb_nat_val *nv = &sc->nv;
	__builtin_memset(nv, 0, sizeof(*nv));
	__builtin_memcpy(nv->client, p->t.saddr, 16);
	__builtin_memcpy(nv->frontend, p->t.daddr, 16);
	nv->client_port = p->t.sport;
	nv->frontend_port = p->t.dport;
	nv->ifindex_in = skb->ifindex;
	nv->rev_nat_id = rev_nat_id;
	nv->last_ns = now;

	__builtin_memcpy(r->saddr, ct->backend, 16);
	r->sport = ct->backend_port;
	r->proto = p->t.proto;
	if (flags & LB_SVC_F_SNAT) {
		/* Masquerade to the address of the device the backend is reached through; a local pod is
		 * reached through its veth, so it sees the address the client came in on. */
		struct lb_dev_addr *da = lb_dev_addrs_v1.lookup(&out_dev);
		if (!da || (da->v4[3] == 0 && !p->v6) || (da->v6[0] == 0 && p->v6)) {
			__u32 in_dev = skb->ifindex;
			da = lb_dev_addrs_v1.lookup(&in_dev);
		}
		if (!da)
			return TC_ACT_SHOT;
		if (p->v6)
			__builtin_memcpy(ct->nat_addr, da->v6, 16);
		else
			__builtin_memcpy(ct->nat_addr, da->v4, 16);
		if (ct->nat_addr[0] == 0 && ct->nat_addr[3] == 0)
			return TC_ACT_SHOT; /* no address of this family to masquerade to */
		ct->flags |= LB_CT_F_SNAT;
		nv->flags = ct->flags;
		__builtin_memcpy(r->daddr, ct->nat_addr, 16);
		struct lb_nat_val *o = 0;
		__u64 seen = 0;
		if (prev && (prev->flags & (LB_CT_F_SNAT | LB_CT_F_RST | LB_CT_F_ENDED)) == (LB_CT_F_SNAT | LB_CT_F_RST) &&
		    addr_eq(prev->nat_addr, ct->nat_addr) && addr_eq(prev->backend, ct->backend) &&
		    prev->backend_port == ct->backend_port) {
			r->dport = prev->nat_port;
			o = lb_nat_v1.lookup(r);
			if (o) {
				nodeport_key(&key, r->proto, p->v6); /* (key is done with: nat_claim's scratch too) */
				if (!port_usable(skb, r, &key, p->v6) || !nat_take_own(o, &p->t, &seen))
					o = 0; /* (the port went to another flow meanwhile: a port of its own, then) */
			}
		}
		if (o) {
			nat_rewrite(o, seen, nv);
		} else {
			if (prev)
				nat_delete_own(old, &p->t);
			int syn = p->t.proto == IPPROTO_TCP &&
				  (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
			if (nat_claim(skb, r, nv, p->v6, syn, now, &key, sc) < 0)
				return TC_ACT_SHOT; /* (prev's lb_ct entry goes in new_flow) */
		}
		ct->nat_port = r->dport;
	} else {
		nv->flags = ct->flags;
		__builtin_memcpy(r->daddr, p->t.saddr, 16);
		r->dport = p->t.sport;
		struct lb_nat_val *o = 0;
		__u64 seen = 0;
		if (prev && !(prev->flags & LB_CT_F_SNAT) && addr_eq(prev->backend, ct->backend) &&
		    prev->backend_port == ct->backend_port) {
			o = lb_nat_v1.lookup(r); /* the same reply tuple */
			if (o && !nat_take_own(o, &p->t, &seen))
				o = 0;
		}
		if (o) {
			nat_rewrite(o, seen, nv);
		} else {
			if (prev)
				nat_delete_own(old, &p->t);
			lb_nat_v1.update(r, nv);
		}
	}
	if (closes(p))
		ct->flags |= LB_CT_F_CLOSING;
	/* prev is rewritten where it is only if it is still the tuple's entry (another CPU may have removed
	 * it since: nat_reclaim, the LRU; its element may then hold another flow already). */
	if (prev && lb_ct_v1.lookup(&p->t) == prev)
		__builtin_memcpy(prev, ct, sizeof(*ct));
	else
		lb_ct_v1.update(&p->t, ct);
	if (prev)
		*prev_done = 1;
	return forward(skb, p, ct);
}

static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p, __u64 now, struct lb_ct_val *prev)
{
	int prev_done = 0;
	int rc = new_flow_in(skb, p, now, prev, &prev_done);

	if (prev && !prev_done) {
		/* No new flow took the old one's place (not a frontend any more, refused, dropped): it ends. */
		struct lb_ct_tuple r = {};

		reply_tuple(&r, &p->t, prev);
		nat_delete_own(&r, &p->t);
		lb_ct_v1.delete(&p->t);
	}
	return rc;
}

/* ---- entry points ---------------------------------------------------------------------------------- */

/* A client's FIN or RST: the flow is closing. Its masquerade entry learns it too, with the time, which
 * decides when the port may go to a new flow (nat_reclaim). */
static __always_inline void flow_closes(struct pkt *p, struct lb_ct_val *ct, __u64 now)
{
	struct lb_ct_tuple r = {};
	struct lb_nat_val *nv;

	__u16 add = closing_flags(p);

	ct_flags_or(ct, add);
	ct->last_ns = now;
	reply_tuple(&r, &p->t, ct);
	__u64 seen;
	nv = lb_nat_v1.lookup(&r);
	if (nv && nat_take_own(nv, &p->t, &seen)) { /* (not taken: the port is another flow's now) */
		nv->last_ns = now;
		nat_unlock(nv, seen, (seen & 0xffff) | add);
	}
}

/*
 * An ICMP error about a translated flow (parse() said ICMP), as conntrack handles a RELATED packet
 * (nf_nat_icmp_reply_translation): the error and its quote are translated as the flow's packets are.
 *  - From the backend's side (tc_pod, or tc_ext for a remote backend): the quote is what the backend got,
 *    masquerade address (or client) -> backend; lb_nat has its reply tuple. The outer header becomes
 *    frontend -> client, the quote client -> frontend, and it goes on to the client as a reply does.
 *  - From the client's side (tc_ext only): the quote is a reply the client got, frontend -> client;
 *    lb_ct has its flow. The outer header becomes masquerade address (or client) -> backend, the quote
 *    backend -> that address, and it goes on to the backend as the flow's packets do.
 * Anything else ICMP is the stack's.
 */
/* Per-CPU room for icmp_error's locals (inlined into bpflb_tc_ext, whose stack is near BPF's 512 bytes). */
struct icmp_scratch {
	struct lb_ct_tuple q, t;
	struct icmp_xlate_to to;
	struct lb_ct_val ct;
	struct ipv6hdr quoted; /* icmp_quote's copy of the quoted IP header */
	struct bpf_fib_lookup fib;
};
BPF_PERCPU_ARRAY(icmp_scratch, struct icmp_scratch, 1);

static __always_inline int icmp_error(struct __sk_buff *skb, struct pkt *p, int from_client)
{
	__u32 zero = 0;
	struct icmp_scratch *sc = icmp_scratch.lookup(&zero);

	if (!sc)
		return TC_ACT_OK;
	struct lb_ct_tuple *q = &sc->q, *t = &sc->t;
	struct icmp_xlate_to *to = &sc->to;
	struct lb_ct_val *ct = &sc->ct;

	/* the two lookup keys (their padding is part of the key); the rest is written before it is read */
	__builtin_memset(q, 0, sizeof(*q));
	__builtin_memset(t, 0, sizeof(*t));
	if (icmp_quote(skb, p, q, &sc->quoted) < 0)
		return TC_ACT_OK;
	/* the quote reversed: a backend's reply tuple (lb_nat), or a client's flow tuple (lb_ct) */
	__builtin_memcpy(t->saddr, q->daddr, 16);
	__builtin_memcpy(t->daddr, q->saddr, 16);
	t->sport = q->dport;
	t->dport = q->sport;
	t->proto = q->proto;
	to->qproto = q->proto;
	__u32 fallback = 0; /* the device redirect_fib falls back to */
	struct lb_nat_val *nv = lb_nat_v1.lookup(t);
	if (nv) {
		fallback = nv->ifindex_in;
		__builtin_memcpy(to->os, nv->frontend, 16);
		__builtin_memcpy(to->od, nv->client, 16);
		__builtin_memcpy(to->qs, nv->client, 16);
		__builtin_memcpy(to->qd, nv->frontend, 16);
		to->qsport = nv->client_port;
		to->qdport = nv->frontend_port;
	} else {
		if (!from_client)
			return TC_ACT_OK;
		struct lb_ct_val *ctp = lb_ct_v1.lookup(t);
		if (!ctp || (ctp->flags & LB_CT_F_ENDED))
			return TC_ACT_OK;
		__builtin_memcpy(ct, ctp, sizeof(*ct));
		const __u32 *as = (ct->flags & LB_CT_F_SNAT) ? ct->nat_addr : t->saddr;

		__builtin_memcpy(to->os, as, 16);
		__builtin_memcpy(to->od, ct->backend, 16);
		__builtin_memcpy(to->qs, ct->backend, 16);
		__builtin_memcpy(to->qd, as, 16);
		to->qsport = ct->backend_port;
		to->qdport = (ct->flags & LB_CT_F_SNAT) ? ct->nat_port : t->sport;
	}
	if (icmp_xlate(skb, p, to) < 0)
		return TC_ACT_SHOT;
	if (!nv && (ct->flags & LB_CT_F_LOCAL)) {
		if (set_macs(skb, ct->mac, 0) < 0)
			return TC_ACT_SHOT;
		return bpf_redirect_peer(ct->ifindex_out, 0);
	}
	return redirect_fib_in(skb, p, fallback, &sc->fib);
}

/*
 * Per packet of an established flow from a client: one lb_ct lookup, one lb_services lookup (is the
 * backend still in its slot?), the rewrite, and the redirect; the entry is written only on a FIN or RST
 * or when its stamp is older than CT_REFRESH_NS. lb_nat is looked up first only for a packet whose
 * destination port is a masquerade port: a remote backend's reply to a masqueraded flow (replies to
 * flows that are not masqueraded never come back through this node's external devices).
 */
int bpflb_tc_ext(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct lb_nat_val *nv;
	struct lb_ct_val *ct;

	int kind = parse(skb, &p);
	if (kind < 0)
		return TC_ACT_OK;
	if (kind > 0)
		return icmp_error(skb, &p, 1);
	__u16 dport = bpf_ntohs(p.t.dport);
	if (dport >= NAT_PORT_MIN && dport <= NAT_PORT_MAX) {
		/* A remote backend's reply to a masqueraded flow? */
		nv = lb_nat_v1.lookup(&p.t);
		if (nv)
			return reply(skb, &p, nv);
	}

	__u64 now = bpf_ktime_get_boot_ns();
	ct = lb_ct_v1.lookup(&p.t);
	if (!ct && p.frag == FRAG_LATER)
		return TC_ACT_OK; /* no flow for it (its first fragment was not translated): the stack's */
	if (ct) {
		int syn = p.t.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
		__u16 flags = ct->flags;

		if (ct_live(p.t.proto, flags, ct->created_ns, ct->last_ns, now) && !(syn && (flags & LB_CT_F_CLOSING)) &&
		    ct_backend_holds(&p, ct)) {
			if (closes(&p))
				flow_closes(&p, ct, now);
			else if (age(now, ct->last_ns) > CT_REFRESH_NS)
				ct->last_ns = now;
			struct lb_ct_val c = *ct;
			return forward(skb, &p, &c);
		}
		if (p.frag == FRAG_LATER)
			return TC_ACT_SHOT; /* a later fragment of a flow that ended: its datagram is lost anyway */
		/* Expired, a new connection on an old tuple, or its backend was removed: the flow ends here
		 * and a new one starts on its tuple (a TCP segment goes to a new backend, which resets it; a
		 * UDP flow picks a new backend, as kube-proxy flushes a removed UDP endpoint's conntrack
		 * entries). new_flow rewrites or removes the old flow's entries. */
	}
	return new_flow(skb, &p, now, ct);
}

int bpflb_tc_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct lb_nat_val *nv;

	int kind = parse(skb, &p);
	if (kind < 0)
		return TC_ACT_OK;
	if (kind > 0)
		return icmp_error(skb, &p, 0);
	nv = lb_nat_v1.lookup(&p.t);
	if (!nv)
		return TC_ACT_OK; /* the pod's own traffic: the stack's */
	return reply(skb, &p, nv);
}
