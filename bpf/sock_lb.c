// SPDX-License-Identifier: GPL-2.0
/*
 * Socket-level service load balancing: cgroup sock_addr programs.
 *
 * connect4/6 (TCP, connected UDP) and sendmsg4/6 (unconnected UDP) translate a frontend
 * (VIP, port, proto) to a backend: TCP once per connection, UDP once per flow (socket, frontend) for
 * as long as conntrack would keep that flow under kube-proxy; recvmsg4/6 and getpeername4/6 translate
 * the backend back to the frontend so the application only ever sees the VIP.
 *
 * Loaded by lb/datapath.py with: -DPIN_ROOT="..." -DSVC_MAP_SIZE=... -DBACKEND_MAP_SIZE=...
 * -DREVNAT_MAP_SIZE=... -DSOCK_REVNAT_SIZE=... -DAFFINITY_MAP_SIZE=... -DENDPOINT_MAP_SIZE=...
 * -DUDP_TIMEOUT_NS=... -DUDP_STREAM_TIMEOUT_NS=...
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/errno.h>
#include "lb_structs.h"

/* From linux/net.h and linux/in6.h, which a BPF program cannot include. */
#define LB_SOCK_STREAM 1
#define LB_SOCK_DGRAM  2
#define LB_IPPROTO_MPTCP 262

/* Draws a new UDP flow makes to find a backend no other live flow of the socket uses. */
#define UDP_AVOID_TRIES 4

/* Shared with tc_lb.c: services, backends, reverse NAT, affinity, endpoints, node addresses, ... */
#include "lb_maps.h"
#include "lb_time.h"

/* UDP sockets' reverse NAT; also read by the agent (lb/sockets.py) to find the sockets to destroy. */
BPF_TABLE_PINNED("lru_hash", struct lb_sock_key, struct lb_sock_val, lb_sock_revnat_v1, SOCK_REVNAT_SIZE, PIN(lb_sock_revnat_v1));
/* TCP sockets' reverse NAT: a slot per socket cookie, and the socket's own storage when its slot is taken
 * (see remember_peer). Pinned so that a restarted agent's programs read what its predecessor's wrote. */
BPF_TABLE_PINNED("array", __u32, struct lb_sock_peer, lb_sock_peer_v1, SOCK_REVNAT_SIZE, PIN(lb_sock_peer_v1));
BPF_TABLE_PINNED("sk_storage", int, struct lb_sock_peer, lb_sock_peer_sk_v1, 0, PIN(lb_sock_peer_sk_v1), BPF_F_NO_PREALLOC);
/* UDP sockets' flows (socket, frontend) -> backend, in the socket's storage: freed with the socket. */
BPF_TABLE_PINNED("sk_storage", int, struct lb_udp_flows, lb_udp_flows_v1, 0, PIN(lb_udp_flows_v1), BPF_F_NO_PREALLOC);

/* The return value of a sock_addr program: 1 lets the syscall go on, 0 fails it with the
 * errno given to bpf_set_retval (EPERM if none). */
#define SYS_PROCEED 1
#define SYS_REJECT  0

struct lb_addr {
	__u32 a[4];
	__u16 port;
};

/* The socket address of the call (user_ip4/user_ip6, user_port) as a 16-byte address. */
static __always_inline void addr_load(struct bpf_sock_addr *ctx, struct lb_addr *la, int is_v6)
{
	if (is_v6) {
		la->a[0] = ctx->user_ip6[0];
		la->a[1] = ctx->user_ip6[1];
		la->a[2] = ctx->user_ip6[2];
		la->a[3] = ctx->user_ip6[3];
	} else {
		la->a[0] = 0;
		la->a[1] = 0;
		la->a[2] = bpf_htonl(0xffff);
		la->a[3] = ctx->user_ip4;
	}
	la->port = (__u16)ctx->user_port;
}

/* Write *la back into the call's socket address: the one place that rewrites user_ip4/user_ip6. */
static __always_inline void addr_store(struct bpf_sock_addr *ctx, const struct lb_addr *la, int is_v6)
{
	if (is_v6) {
		ctx->user_ip6[0] = la->a[0];
		ctx->user_ip6[1] = la->a[1];
		ctx->user_ip6[2] = la->a[2];
		ctx->user_ip6[3] = la->a[3];
	} else {
		ctx->user_ip4 = la->a[3];
	}
	ctx->user_port = (__u32)la->port;
}

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline int addr_eq(const __u32 *x, const __u32 *y)
{
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/*
 * A remembered choice (affinity, a UDP flow) holds only while its backend still sits in the slot it
 * was chosen from, so it never picks an endpoint the policy dropped or a removed one (kube-proxy flushes
 * a removed UDP endpoint's conntrack entries). The agent keeps a surviving backend in its slot, so this
 * check is exact and O(1).
 */
static __always_inline int slot_holds(struct lb_svc_key *key, __u16 count, __u16 slot, __u32 backend_id)
{
	struct lb_svc_val *s;

	if (slot == 0 || slot > count)
		return 0;
	key->slot = slot;
	s = lb_services_v1.lookup(key);
	return s && s->backend_id == backend_id;
}

/* Sticky backend of this client for this frontend, if used within the timeout and still in its slot. */
static __always_inline __u32 affinity_lookup(struct lb_affinity_key *ak, struct lb_svc_key *key,
					     const struct lb_svc_val *svc, __u64 now)
{
	struct lb_affinity_val *av = lb_affinity_v1.lookup(ak);

	if (!av)
		return 0;
	if (age(now, av->last_used_ns) > (__u64)svc->affinity_timeout * 1000000000ULL)
		return 0;
	if (!slot_holds(key, svc->count, av->slot, av->backend_id))
		return 0;
	return av->backend_id;
}

/* ---- UDP flows: conntrack's view of a UDP socket, kept in the socket's storage ---------------- */

/* The loops over a socket's flows and pending datagrams are bounded loops (#pragma nounroll), not
 * unrolled: the verifier accepts a constant bound (kernel >= 5.3), and four programs inlining every loop
 * unrolled made clang's compile of this file 1.3 s instead of 0.75 s (the verifier's extra 0.3 s
 * for walking the loops is less than that; bench/program_time.py). Only UDP sockets reach them. */

/* Would conntrack still hold this flow? (See UDP_TIMEOUT_NS.) */
static __always_inline int udp_flow_live(const struct lb_udp_flow *f, __u64 now)
{
	__u64 timeout = UDP_TIMEOUT_NS;

	if (f->rev_nat_id == 0)
		return 0;
	if ((f->flags & LB_UDP_F_REPLIED) && age(f->last_ns, f->created_ns) > UDP_STREAM_AFTER_NS)
		timeout = UDP_STREAM_TIMEOUT_NS;
	return age(now, f->last_ns) <= timeout;
}

/* The entry of frontend rev_nat_id (live or not), or LB_UDP_FLOWS. A frontend has at most one. */
static __always_inline __u32 udp_flow_find(struct lb_udp_flows *fl, __u32 rev_nat_id)
{
#pragma nounroll
	for (__u32 i = 0; i < LB_UDP_FLOWS; i++)
		if (fl->flow[i].rev_nat_id == rev_nat_id)
			return i;
	return LB_UDP_FLOWS;
}

static __always_inline int udp_flow_to(const struct lb_udp_flow *f, const __u32 *addr, __u16 port, __u64 now)
{
	return f->backend_port == port && addr_eq(f->backend, addr) && udp_flow_live(f, now);
}

/* Does another live flow of this socket use backend be? Its replies and ours would look alike. */
static __always_inline int udp_backend_taken(struct lb_udp_flows *fl, const struct lb_backend *be, __u32 rev_nat_id,
					     __u64 now)
{
#pragma nounroll
	for (__u32 i = 0; i < LB_UDP_FLOWS; i++) {
		struct lb_udp_flow *f = &fl->flow[i];

		if (f->rev_nat_id != rev_nat_id && udp_flow_to(f, be->addr, be->port, now))
			return 1;
	}
	return 0;
}

/* Where a new flow goes: its frontend's old entry, else a free or expired one, else the least recently used. */
static __always_inline __u32 udp_flow_entry(struct lb_udp_flows *fl, __u32 fi, __u64 now)
{
	__u32 pick = LB_UDP_FLOWS, oldest = 0;
	__u64 oldest_ns = ~0ULL;

	if (fi < LB_UDP_FLOWS)
		return fi;
#pragma nounroll
	for (__u32 i = 0; i < LB_UDP_FLOWS; i++) {
		struct lb_udp_flow *f = &fl->flow[i];

		if (pick == LB_UDP_FLOWS && !udp_flow_live(f, now))
			pick = i;
		if (f->last_ns < oldest_ns) {
			oldest_ns = f->last_ns;
			oldest = i;
		}
	}
	return pick < LB_UDP_FLOWS ? pick : oldest;
}

/*
 * Note this datagram on flow fi (the flow chose, or kept, backend be for frontend *fe). A new flow
 * forgets the datagrams its entry's previous flow sent. An unconnected send is remembered in send
 * order: replies from a backend two of the socket's flows share are matched to the oldest datagram
 * sent to it (udp_flow_of_reply).
 */
static __always_inline void udp_flow_note(struct lb_udp_flows *fl, __u32 fi, int is_new, const struct lb_backend *be,
					  __u32 backend_id, __u16 slot, const struct lb_addr *fe, __u32 rev_nat_id,
					  __u64 now, int is_send)
{
	struct lb_udp_flow *f = &fl->flow[fi & (LB_UDP_FLOWS - 1)];

	if (is_new) {
#pragma nounroll
		for (__u32 i = 0; i < LB_UDP_PENDING; i++)
			if (fl->pending[i].flow == fi + 1)
				fl->pending[i].flow = 0;
		__builtin_memcpy(f->backend, be->addr, sizeof(f->backend));
		__builtin_memcpy(f->frontend, fe->a, sizeof(f->frontend));
		f->backend_port = be->port;
		f->frontend_port = fe->port;
		f->backend_id = backend_id;
		f->rev_nat_id = rev_nat_id;
		f->slot = slot;
		f->flags = 0;
		f->created_ns = now;
	}
	f->last_ns = now;
	if (is_send) {
		__u32 seq = fl->next_seq++;
		struct lb_udp_pending *p = &fl->pending[seq & (LB_UDP_PENDING - 1)];

		p->seq = seq;
		p->flow = fi + 1;
	}
}

/*
 * The flow a datagram from backend *from belongs to, or LB_UDP_FLOWS. Under kube-proxy, conntrack gives
 * the second of two flows that would share a reply tuple another source port, so their replies differ;
 * a socket has only one port. So a new flow first avoids a backend another live flow uses (exact), and
 * where the frontends share every backend, replies are matched to datagrams in send order (the oldest
 * datagram sent to that backend and not yet answered; a datagram that never got a reply is forgotten
 * LB_UDP_PENDING sends later). With nothing waiting, the most recently used live flow to it answers.
 */
static __always_inline __u32 udp_flow_of_reply(struct lb_udp_flows *fl, const struct lb_addr *from, __u64 now)
{
	__u32 best = LB_UDP_PENDING, best_seq = 0, fi = LB_UDP_FLOWS;
	__u64 latest = 0;

#pragma nounroll
	for (__u32 i = 0; i < LB_UDP_PENDING; i++) {
		struct lb_udp_pending *p = &fl->pending[i];
		__u32 idx = (p->flow - 1) & (LB_UDP_FLOWS - 1);

		if (p->flow == 0 || !udp_flow_to(&fl->flow[idx], from->a, from->port, now))
			continue;
		if (best == LB_UDP_PENDING || (__s32)(p->seq - best_seq) < 0) {
			best = i;
			best_seq = p->seq;
			fi = idx;
		}
	}
	if (best < LB_UDP_PENDING) {
		fl->pending[best & (LB_UDP_PENDING - 1)].flow = 0;
		return fi;
	}
#pragma nounroll
	for (__u32 i = 0; i < LB_UDP_FLOWS; i++) {
		struct lb_udp_flow *f = &fl->flow[i];

		if (udp_flow_to(f, from->a, from->port, now) && f->last_ns >= latest) {
			latest = f->last_ns;
			fi = i;
		}
	}
	return fi;
}

/* Draw a slot in 1..count and return its backend (0 if the slot or the backend is gone). */
static __always_inline struct lb_backend *pick_backend(struct lb_svc_key *key, __u16 count, __u32 *backend_id,
							__u16 *slot_nr)
{
	struct lb_svc_val *slot;

	key->slot = (bpf_get_prandom_u32() % count) + 1;
	*slot_nr = key->slot;
	slot = lb_services_v1.lookup(key);
	if (!slot)
		return 0;
	*backend_id = slot->backend_id;
	return lb_backends_v1.lookup(backend_id);
}

static __always_inline struct lb_sock_peer *peer_slot(__u64 cookie)
{
	__u32 idx = cookie % SOCK_REVNAT_SIZE;

	return lb_sock_peer_v1.lookup(&idx);
}

static __always_inline void peer_fill(struct lb_sock_peer *p, const struct lb_backend *be, const struct lb_addr *fe,
				      __u32 rev_nat_id)
{
	__builtin_memcpy(p->backend, be->addr, sizeof(p->backend));
	__builtin_memcpy(p->frontend, fe->a, sizeof(p->frontend));
	p->backend_port = be->port;
	p->frontend_port = fe->port;
	p->rev_nat_id = rev_nat_id;
}

/*
 * Remember, for getpeername and recvmsg, that this socket's peer ``be`` is the frontend *fe.
 *
 * A TCP socket has one peer for its life. It claims the array slot of its cookie (cookie % size) if the
 * slot is free or already its own: a few stores, no lock, no allocation (measured 0.65 us less per
 * connect than socket storage, 0.5 us less than the LRU update plus its delete at close). The release
 * hook frees the slot. If another live socket holds the slot, the pair goes into this socket's own
 * storage, which the kernel frees with the socket: every socket is remembered exactly, for its life.
 *
 * A connected UDP socket's pair lives in the LRU lb_sock_revnat, keyed by (cookie, backend), where the
 * agent also finds the sockets to destroy when a UDP backend goes away; the release hook forgets it.
 * (An unconnected one keeps its flows in its storage, lb_udp_flows, and comes here only if the kernel
 * had no memory for that storage.)
 */
static __always_inline void remember_peer(struct bpf_sock_addr *ctx, __u8 proto, const struct lb_backend *be,
					  const struct lb_addr *fe, __u32 rev_nat_id)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	if (proto == IPPROTO_TCP) {
		/* An MPTCP socket connects through its first subflow, a kernel TCP socket: connect runs on
		 * the subflow, getpeername on the MPTCP socket, so the pair goes in the MPTCP socket's storage
		 * (NULL for a plain TCP socket). */
		void *msk = bpf_skc_to_mptcp_sock(ctx->sk);
		if (msk) {
			struct lb_sock_peer *mp = lb_sock_peer_sk_v1.sk_storage_get(msk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (mp)
				peer_fill(mp, be, fe, rev_nat_id);
			return;
		}
		struct lb_sock_peer *p = peer_slot(cookie);

		if (p) {
			__u64 owner = __sync_val_compare_and_swap(&p->cookie, 0, cookie);

			if (owner == 0 || owner == cookie) {
				peer_fill(p, be, fe, rev_nat_id);
				return;
			}
		}
		p = lb_sock_peer_sk_v1.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (p) {
			peer_fill(p, be, fe, rev_nat_id);
			return;
		}
		/* No memory for the socket's storage: fall back to the map, as for UDP. */
	}
	struct lb_sock_key sk = {};
	struct lb_sock_val sv = {};
	sk.cookie = cookie;
	__builtin_memcpy(sk.addr, be->addr, sizeof(sk.addr));
	sk.port = be->port;
	__builtin_memcpy(sv.addr, fe->a, sizeof(sv.addr));
	sv.port = fe->port;
	sv.rev_nat_id = rev_nat_id;
	lb_sock_revnat_v1.update(&sk, &sv);
}

/* This TCP socket's remembered peer, wherever remember_peer put it, or 0. */
static __always_inline struct lb_sock_peer *peer_of(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct lb_sock_peer *p = peer_slot(cookie);

	if (p && p->cookie == cookie)
		return p;
	return lb_sock_peer_sk_v1.sk_storage_get(ctx->sk, 0, 0);
}

/* A TCP socket connecting to a non-service (again, after a disconnect) has no translated peer any more. */
static __always_inline void forget_peer(struct bpf_sock_addr *ctx, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return;
	struct lb_sock_peer *p = peer_of(ctx);
	if (p)
		p->rev_nat_id = 0; /* matches no live frontend (IDs start at 1) */
}

/*
 * Translate the frontend in *la to a backend, in place, and remember the pair for the reverse
 * direction. Returns 1 if *la now holds the backend, 0 if *la is not a frontend (left alone), or a
 * negative errno if the call must fail (no backend: -ECONNREFUSED, or -EHOSTUNREACH under DROP_EMPTY
 * and when the backend cannot be reached from this socket's family).
 */
static __always_inline int sock_xlate_fwd(struct bpf_sock_addr *ctx, struct lb_addr *la, __u8 proto, int is_v6,
					  int is_send)
{
	struct lb_svc_key key = {};
	struct lb_svc_val *svc;
	struct lb_backend *be;
	__u32 backend_id = 0;
	__u16 slot_nr = 0;

	__builtin_memcpy(key.addr, la->a, sizeof(key.addr));
	key.dport = la->port;
	key.proto = proto;
	key.scope = LB_SCOPE_INTERNAL;
	svc = lb_services_v1.lookup(&key);
	if (!svc) {
		/* A node's address on a NodePort (this node's or another's, as lb_node_addrs lists them):
		 * the wildcard frontend, translated here like a ClusterIP so that no packet hairpins
		 * (Cilium's surrogate lookup). Only on a miss: the ClusterIP hit path pays nothing. */
		struct lb_node_addr *na = lb_node_addrs_v1.lookup((struct lb_node_addr_key *)key.addr);
		if (!na)
			return 0; /* not a frontend (or a wrong port on a VIP): leave it alone */
		key.addr[0] = 0;
		key.addr[1] = 0;
		key.addr[3] = 0; /* addr[2] stays ::ffff for IPv4 (0.0.0.0 mapped), 0 for IPv6 (::) */
		svc = lb_services_v1.lookup(&key);
		if (!svc)
			return 0;
		/* Another node's address on an externalTrafficPolicy Local nodePort: which endpoints serve
		 * it, and that the client's address is kept, is that node's to decide (its own endpoints),
		 * so the connect goes there untranslated, as behind kube-proxy, whose rules for it run on
		 * that node only. Translated here, the caller would get this node's cluster set and reach
		 * the backend from the overlay's address (e2e: "should support externalTrafficPolicy=Local
		 * for type=NodePort", "should fallback to local terminating endpoints ... Local"). */
		if (!(na->flags & LB_NODE_ADDR_F_NODEPORT) && (svc->flags & LB_SVC_F_EXT_LOCAL))
			return 0;
	}

	__u16 count = svc->count;
	__u16 flags = svc->flags;
	__u32 rev_nat_id = svc->rev_nat_id;

	if (count == 0)
		return (flags & LB_SVC_F_DROP_EMPTY) ? -EHOSTUNREACH : -ECONNREFUSED;

	/*
	 * sessionAffinity ClientIP at the socket layer: "the same client" is the caller's network
	 * namespace (bpf_get_netns_cookie), not a source IP. At connect() the source address is often
	 * not chosen yet (an unbound socket), and reading it would need the route lookup we run before.
	 * In Kubernetes a pod is exactly one network namespace with one IP per family, so the netns is the
	 * pod's IP; host-network processes share the node's namespace, just as kube-proxy sees them all
	 * arrive from the node IP. It is also stable across the pod's sockets and IP families.
	 */
	struct lb_affinity_key ak = {};
	__u64 now = 0;
	/*
	 * A UDP socket's flow to this frontend keeps its backend while conntrack would keep the flow, as
	 * kube-proxy's DNAT does: per (socket, frontend), remembered in the socket's storage, rather than the
	 * socket cookie hashed over the slots (Cilium's choice), which moves every socket to another
	 * backend whenever the slot count changes and never expires. Different sockets still draw at random.
	 * An established flow comes before affinity, as a conntrack entry comes before kube-proxy's rules.
	 */
	struct lb_udp_flows *fl = 0;
	__u32 fi = LB_UDP_FLOWS;
	int flow_kept = 0;
	if (proto == IPPROTO_UDP) {
		now = bpf_ktime_get_boot_ns();
		fl = lb_udp_flows_v1.sk_storage_get(ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (fl) {
			fi = udp_flow_find(fl, rev_nat_id);
			if (fi < LB_UDP_FLOWS) {
				struct lb_udp_flow *f = &fl->flow[fi & (LB_UDP_FLOWS - 1)];

				if (udp_flow_live(f, now) && slot_holds(&key, count, f->slot, f->backend_id)) {
					backend_id = f->backend_id;
					slot_nr = f->slot;
					flow_kept = 1;
				}
			}
		}
	}
	if (!backend_id && (flags & LB_SVC_F_AFFINITY)) {
		ak.client = bpf_get_netns_cookie(ctx);
		ak.rev_nat_id = rev_nat_id;
		if (!now)
			now = bpf_ktime_get_boot_ns();
		backend_id = affinity_lookup(&ak, &key, svc, now);
		slot_nr = key.slot;
	}

	be = 0;
	if (backend_id)
		be = lb_backends_v1.lookup(&backend_id);
	if (!be) {
		flow_kept = 0;
		be = pick_backend(&key, count, &backend_id, &slot_nr);
		if (!be) {
			/* We read the master just before the agent shrank this frontend and trimmed the
			 * slot we drew (or freed its backend): read the master again and draw again. */
			key.slot = 0;
			svc = lb_services_v1.lookup(&key);
			if (!svc)
				return 0; /* the frontend itself is gone: not a service any more */
			if (svc->count == 0)
				return (svc->flags & LB_SVC_F_DROP_EMPTY) ? -EHOSTUNREACH : -ECONNREFUSED;
			count = svc->count;
			be = pick_backend(&key, count, &backend_id, &slot_nr);
			if (!be)
				return -EHOSTUNREACH;
		}
		/* A new UDP flow: prefer a backend no other live flow of this socket uses, so that
		 * replies tell their frontend apart exactly (see udp_flow_of_reply). */
		if (fl && !(flags & LB_SVC_F_AFFINITY)) {
			__u16 first = slot_nr;
#pragma nounroll
			for (__u16 i = 1; i < UDP_AVOID_TRIES; i++) {
				if (i >= count || !udp_backend_taken(fl, be, rev_nat_id, now))
					break;
				key.slot = ((first - 1 + i) % count) + 1;
				struct lb_svc_val *s = lb_services_v1.lookup(&key);
				if (!s)
					break;
				__u32 id = s->backend_id;
				struct lb_backend *b = lb_backends_v1.lookup(&id);
				if (!b)
					break;
				be = b;
				backend_id = id;
				slot_nr = key.slot;
			}
		}
	}
	/* A v4 socket can only reach a v4 backend; families are filtered by the agent. */
	if (!is_v6 && !is_v4_mapped(be->addr))
		return -EHOSTUNREACH;

	if (flags & LB_SVC_F_AFFINITY) {
		struct lb_affinity_val av = { .backend_id = backend_id, .slot = slot_nr, .last_used_ns = now };
		lb_affinity_v1.update(&ak, &av);
	}

	if (fl)
		udp_flow_note(fl, udp_flow_entry(fl, fi, now), !flow_kept, be, backend_id, slot_nr, la, rev_nat_id, now,
			      is_send);
	if (!is_send || !fl)
		remember_peer(ctx, proto, be, la, rev_nat_id);
	__builtin_memcpy(la->a, be->addr, sizeof(la->a));
	la->port = be->port;
	return 1;
}

/* The service may be gone or its ID reused since the socket was translated: only a live frontend
 * with this ID and this address counts. */
static __always_inline int frontend_live(__u32 rev_nat_id, const __u32 *addr, __u16 port)
{
	struct lb_revnat *rn = lb_revnat_v1.lookup(&rev_nat_id);

	if (!rn || rn->port != port)
		return 0;
	/* A NodePort's frontend is the wildcard (0.0.0.0 / ::): the socket dialled a node address. */
	return addr_eq(rn->addr, addr) || (rn->addr[0] == 0 && rn->addr[1] == 0 && rn->addr[3] == 0);
}

/*
 * Backend -> frontend for a socket that was translated: if *la is the backend this socket was sent
 * to, rewrite it to the frontend. Returns 1 if *la was rewritten, 0 if left alone.
 */
static __always_inline int sock_xlate_rev(struct bpf_sock_addr *ctx, struct lb_addr *la, __u8 proto, int is_recv)
{
	if (proto == IPPROTO_TCP) {
		struct lb_sock_peer *p = peer_of(ctx);

		if (p && p->backend_port == la->port && addr_eq(p->backend, la->a)) {
			if (!frontend_live(p->rev_nat_id, p->frontend, p->frontend_port))
				return 0;
			__builtin_memcpy(la->a, p->frontend, sizeof(la->a));
			la->port = p->frontend_port;
			return 1;
		}
		/* Not found: a TCP socket translated by a bpflb before lb_sock_peer (an upgrade under
		 * established connections) is in the map; look there too. */
	}

	/* A datagram's source: which of the socket's UDP flows it answers (a connected socket's peer is in
	 * the map below, and getpeername asks only for that). */
	struct lb_udp_flows *fl = is_recv ? lb_udp_flows_v1.sk_storage_get(ctx->sk, 0, 0) : 0;
	if (fl) {
		__u64 now = bpf_ktime_get_boot_ns();
		__u32 fi = udp_flow_of_reply(fl, la, now);

		if (fi < LB_UDP_FLOWS) {
			struct lb_udp_flow *f = &fl->flow[fi & (LB_UDP_FLOWS - 1)];

			if (frontend_live(f->rev_nat_id, f->frontend, f->frontend_port)) {
				f->last_ns = now; /* a reply refreshes the flow, as it does a conntrack entry */
				f->flags |= LB_UDP_F_REPLIED;
				__builtin_memcpy(la->a, f->frontend, sizeof(la->a));
				la->port = f->frontend_port;
				return 1;
			}
		}
	}

	struct lb_sock_key sk = {};
	struct lb_sock_val *sv;

	sk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(sk.addr, la->a, sizeof(sk.addr));
	sk.port = la->port;
	sv = lb_sock_revnat_v1.lookup(&sk);
	if (!sv)
		return 0;
	if (!frontend_live(sv->rev_nat_id, sv->addr, sv->port)) {
		lb_sock_revnat_v1.delete(&sk);
		return 0;
	}
	__builtin_memcpy(la->a, sv->addr, sizeof(la->a));
	la->port = sv->port;
	return 1;
}

/* connect/sendmsg: frontend -> backend. A negative errno fails the syscall with that errno. */
static __always_inline int fwd(struct bpf_sock_addr *ctx, __u8 proto, int is_v6, int is_send)
{
	struct lb_addr la;
	int ret;

	addr_load(ctx, &la, is_v6);
	ret = sock_xlate_fwd(ctx, &la, proto, is_v6, is_send);
	if (ret < 0) {
		bpf_set_retval(ret);
		return SYS_REJECT;
	}
	if (ret > 0)
		addr_store(ctx, &la, is_v6);
	else
		forget_peer(ctx, proto);
	return SYS_PROCEED;
}

/* recvmsg/getpeername: backend -> frontend. */
static __always_inline int rev(struct bpf_sock_addr *ctx, __u8 proto, int is_v6, int is_recv)
{
	struct lb_addr la;

	addr_load(ctx, &la, is_v6);
	if (sock_xlate_rev(ctx, &la, proto, is_recv))
		addr_store(ctx, &la, is_v6);
	return SYS_PROCEED;
}

/*
 * The service protocol of this socket, or 0 to leave it alone. The socket's protocol decides, not only
 * its type: an SCTP stream or a UDP-Lite datagram socket must never reach a TCP or UDP backend (raw and
 * ICMP sockets are not services either). MPTCP counts as TCP: every subflow is a TCP connection on
 * the wire, which kube-proxy's conntrack DNATs as TCP, and a TCP backend answers an MPTCP connect with
 * plain TCP (the client falls back). Here the translation is in the MPTCP socket, so extra subflows go
 * to the backend itself, where kube-proxy would DNAT each one to a random backend.
 */
static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	__u32 type = ctx->type;
	__u32 protocol = ctx->protocol;

	if (type == LB_SOCK_STREAM && (protocol == IPPROTO_TCP || protocol == LB_IPPROTO_MPTCP))
		return IPPROTO_TCP;
	if (type == LB_SOCK_DGRAM && protocol == IPPROTO_UDP)
		return IPPROTO_UDP;
	return 0;
}

int bpflb_conn4(struct bpf_sock_addr *ctx)
{
	__u8 proto = sock_proto(ctx);

	return proto ? fwd(ctx, proto, 0, 0) : SYS_PROCEED;
}

int bpflb_conn6(struct bpf_sock_addr *ctx)
{
	__u8 proto = sock_proto(ctx);

	return proto ? fwd(ctx, proto, 1, 0) : SYS_PROCEED;
}

int bpflb_send4(struct bpf_sock_addr *ctx)
{
	return sock_proto(ctx) == IPPROTO_UDP ? fwd(ctx, IPPROTO_UDP, 0, 1) : SYS_PROCEED;
}

int bpflb_send6(struct bpf_sock_addr *ctx)
{
	return sock_proto(ctx) == IPPROTO_UDP ? fwd(ctx, IPPROTO_UDP, 1, 1) : SYS_PROCEED;
}

int bpflb_recv4(struct bpf_sock_addr *ctx)
{
	return sock_proto(ctx) == IPPROTO_UDP ? rev(ctx, IPPROTO_UDP, 0, 1) : SYS_PROCEED;
}

int bpflb_recv6(struct bpf_sock_addr *ctx)
{
	return sock_proto(ctx) == IPPROTO_UDP ? rev(ctx, IPPROTO_UDP, 1, 1) : SYS_PROCEED;
}

int bpflb_peer4(struct bpf_sock_addr *ctx)
{
	__u8 proto = sock_proto(ctx);

	return proto ? rev(ctx, proto, 0, 0) : SYS_PROCEED;
}

int bpflb_peer6(struct bpf_sock_addr *ctx)
{
	__u8 proto = sock_proto(ctx);

	return proto ? rev(ctx, proto, 1, 0) : SYS_PROCEED;
}

/*
 * Socket release: free a TCP socket's peer slot, and forget a connected UDP socket's reverse-NAT
 * entry (without it the LRU map stays full and every translated connect pays for an eviction).
 * What a socket keeps in its own storage (a TCP peer, a UDP socket's flows) is freed by the kernel,
 * so an unconnected UDP socket, which never wrote the map, leaves nothing behind either.
 */
int bpflb_release(struct bpf_sock *ctx)
{
	struct lb_sock_key sk = {};
	/* Every field is read once, up front, at a constant offset: clang otherwise shares one
	 * computed ctx pointer between the two families, which the verifier rejects. */
	__u32 type = ctx->type;
	__u32 family = ctx->family;
	__u16 port = ctx->dst_port;
	__u32 ip4 = ctx->dst_ip4;
	__u32 ip6_0 = ctx->dst_ip6[0], ip6_1 = ctx->dst_ip6[1], ip6_2 = ctx->dst_ip6[2], ip6_3 = ctx->dst_ip6[3];

	if (port == 0)
		return 1; /* never connected (listening, unconnected UDP): nothing to forget */
	if (type == LB_SOCK_STREAM) { /* TCP or MPTCP: another stream protocol never claimed a slot */
		__u64 cookie = bpf_get_socket_cookie(ctx);
		__u32 idx = cookie % SOCK_REVNAT_SIZE;
		struct lb_sock_peer *p = lb_sock_peer_v1.lookup(&idx);

		if (p && p->cookie == cookie)
			__sync_val_compare_and_swap(&p->cookie, cookie, 0);
		return 1;
	}
	if (type != LB_SOCK_DGRAM)
		return 1;
	if (family == 2 /* AF_INET */) {
		sk.addr[2] = bpf_htonl(0xffff);
		sk.addr[3] = ip4;
	} else if (family == 10 /* AF_INET6 */) {
		sk.addr[0] = ip6_0;
		sk.addr[1] = ip6_1;
		sk.addr[2] = ip6_2;
		sk.addr[3] = ip6_3;
	} else {
		return 1;
	}
	sk.port = port;
	sk.cookie = bpf_get_socket_cookie(ctx);
	lb_sock_revnat_v1.delete(&sk);
	return 1;
}
