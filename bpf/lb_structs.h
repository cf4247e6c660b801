/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one definition of every map key and value shared by the datapath and the agent.
 * Python mirrors these in lb/maps/structs.py; tests/test_structs.py checks the mirror
 * field by field against what bcc compiles from this file. Change a struct -> bump LB_MAP_VERSION.
 *
 * Addresses are always 16 bytes, network byte order; IPv4 is stored IPv4-mapped (::ffff:a.b.c.d),
 * so one map serves both families and a dual-stack socket dialling ::ffff:VIP finds the IPv4 service.
 * Ports are network byte order.
 */
#ifndef BPFLB_LB_STRUCTS_H
#define BPFLB_LB_STRUCTS_H

#define LB_MAP_VERSION "v1"

/* lb_svc_val.flags */
#define LB_SVC_F_DROP_EMPTY   (1 << 0) /* count == 0: drop (Local policy, none here), not reject */
#define LB_SVC_F_AFFINITY     (1 << 1) /* sessionAffinity: ClientIP */
#define LB_SVC_F_SNAT         (1 << 2) /* EXTERNAL, externalTrafficPolicy Cluster: masquerade to the node address */
#define LB_SVC_F_SRC_RANGES   (1 << 3) /* loadBalancerSourceRanges: lb_src_ranges decides who may connect */
#define LB_SVC_F_NODEPORT     (1 << 4) /* a wildcard node-address frontend (addr 0.0.0.0 / ::) */
#define LB_SVC_F_EXT_LOCAL    (1 << 5) /* INTERNAL wildcard of an externalTrafficPolicy Local port: another
                                        * node's address is left to that node (its local endpoints) */

/* lb_svc_key.scope */
#define LB_SCOPE_INTERNAL 0 /* traffic from inside the cluster (socket hooks) */
#define LB_SCOPE_EXTERNAL 1 /* traffic from outside (tc), differs under externalTrafficPolicy Local */

struct lb_svc_key {
	__u32 addr[4];   /* frontend VIP */
	__u16 dport;     /* frontend port */
	__u8  proto;     /* IPPROTO_TCP / IPPROTO_UDP */
	__u8  scope;     /* LB_SCOPE_* */
	__u16 slot;      /* 0 = master entry, 1..count = backend slots */
	__u16 pad;
};

struct lb_svc_val {
	__u32 backend_id;       /* slots: backend in lb_backends; master: 0 */
	__u32 rev_nat_id;       /* the frontend's ID (key of lb_revnat) */
	__u16 count;            /* master: number of backend slots; slots: 0 */
	__u16 flags;            /* master: LB_SVC_F_* */
	__u32 affinity_timeout; /* master: sessionAffinity timeout in seconds */
};

struct lb_backend {
	__u32 addr[4];
	__u16 port;
	__u8  proto;
	__u8  flags;
};

struct lb_revnat {
	__u32 addr[4];          /* the frontend VIP a reply must appear to come from */
	__u16 port;
	__u16 pad;
};

/* Socket reverse NAT of connected UDP sockets: (socket, backend) -> frontend, for getpeername and
 * recvmsg, and for the agent to find the sockets to destroy when a UDP backend goes away (its peer is
 * fixed in the socket). Unconnected UDP sockets keep their flows in lb_udp_flows instead. */
struct lb_sock_key {
	__u64 cookie;
	__u32 addr[4];          /* backend address */
	__u16 port;             /* backend port */
	__u16 pad[3];
};

struct lb_sock_val {
	__u32 addr[4];          /* frontend VIP */
	__u16 port;
	__u16 pad;
	__u32 rev_nat_id;
};

/*
 * Socket reverse NAT of a connected TCP socket: its one peer. Kept in an array indexed by the socket
 * cookie (slot = cookie % size, claimed by writing the cookie, cleared by the release hook); a socket
 * whose slot another live socket holds keeps it in its own storage instead (sk storage, same value).
 * Read only by the datapath.
 */
struct lb_sock_peer {
	__u64 cookie;           /* the socket owning this slot; 0 = free (unused in sk storage) */
	__u32 backend[4];       /* the backend connect() was sent to */
	__u32 frontend[4];      /* the frontend VIP the application dialled */
	__u16 backend_port;
	__u16 frontend_port;
	__u32 rev_nat_id;
};

/*
 * A UDP socket's flows, as conntrack keeps them for kube-proxy: one per (socket, frontend), holding the
 * backend that frontend chose for this socket until the flow times out (lb_udp_flow_live). Kept in the
 * socket's own storage (lb_udp_flows sk_storage): the kernel frees it with the socket, so nothing leaks
 * whichever way the socket goes (close, exit, SOCK_DESTROY), and a socket reaches only its own flows.
 * Read only by the datapath.
 */
#define LB_UDP_FLOWS   8 /* flows one socket keeps at once; a ninth frontend evicts the least recently used */
#define LB_UDP_PENDING 8 /* datagrams remembered in send order, to tell apart replies from a shared backend */

/* lb_udp_flow.flags */
#define LB_UDP_F_REPLIED (1 << 0) /* a reply was seen (conntrack's SEEN_REPLY) */

struct lb_udp_flow {
	__u64 last_ns;          /* bpf_ktime_get_boot_ns() of the flow's last datagram, either way */
	__u64 created_ns;
	__u32 backend[4];
	__u32 frontend[4];
	__u16 backend_port;
	__u16 frontend_port;
	__u32 backend_id;
	__u32 rev_nat_id;       /* the frontend; 0 = a free entry */
	__u16 slot;             /* where backend_id sat; the flow holds only while it still sits there */
	__u16 flags;            /* LB_UDP_F_* */
};

struct lb_udp_pending {
	__u32 seq;              /* send order (lb_udp_flows.next_seq when sent) */
	__u32 flow;             /* index + 1 in lb_udp_flows.flow of the flow the datagram went out on; 0 = none */
};

struct lb_udp_flows {
	struct lb_udp_flow flow[LB_UDP_FLOWS];
	struct lb_udp_pending pending[LB_UDP_PENDING]; /* slot seq % LB_UDP_PENDING: the oldest is overwritten */
	__u32 next_seq;
	__u32 pad;
};

/* sessionAffinity ClientIP: (client, frontend) -> backend chosen last time. */
struct lb_affinity_key {
	__u64 client;           /* network namespace cookie of the connecting socket */
	__u32 rev_nat_id;
	__u32 pad;
};

struct lb_affinity_val {
	__u32 backend_id;
	__u16 slot;             /* where backend_id sat; the agent keeps a surviving backend's slot */
	__u16 pad;
	__u64 last_used_ns;     /* bpf_ktime_get_boot_ns() of the last new connection */
};

/* Local pod endpoints, written by the CNI plugin (via the agent): pod IP -> its host-side veth. */
struct lb_endpoint_key {
	__u32 addr[4];
};

struct lb_endpoint {
	__u32 ifindex;          /* host end of the pod's veth pair */
	__u8  mac[6];           /* the pod's eth0 MAC, for a redirect that rewrites L2 */
	__u16 flags;
};

/* ---- north-south (tc) --------------------------------------------------------------------------- */

/* lb_node_addr.flags */
#define LB_NODE_ADDR_F_NODEPORT (1 << 0) /* this node's: NodePorts are served on it (--nodeport-addresses), tc and sockets */
#define LB_NODE_ADDR_F_REMOTE   (1 << 1) /* another node's: only local callers' sockets translate its NodePorts
                                          * (externalTrafficPolicy Cluster ones: LB_SVC_F_EXT_LOCAL) */

/* The node's own addresses, written by the agent: a packet (tc) or a connect (socket) to one of them
 * on a NodePort finds the wildcard frontend (0.0.0.0 / :: , LB_SVC_F_NODEPORT). */
struct lb_node_addr_key {
	__u32 addr[4];
};

struct lb_node_addr {
	__u32 flags;            /* LB_NODE_ADDR_F_* */
};

/* loadBalancerSourceRanges, an LPM trie: (frontend, client prefix). prefixlen counts the bits after
 * itself: 32 (rev_nat_id) + 96 + the IPv4 prefix length for IPv4 (mapped), 32 + the IPv6 one. */
struct lb_src_range_key {
	__u32 prefixlen;
	__u32 rev_nat_id;
	__u32 addr[4];
};

struct lb_src_range {
	__u8 allow;
	__u8 pad[3];
};

/* sessionAffinity ClientIP for traffic from outside: keyed by the client's real address. */
struct lb_ext_affinity_key {
	__u32 client[4];
	__u32 rev_nat_id;
	__u32 pad;
};

/* A device's own addresses (ifindex -> its first global IPv4, IPv6), written by the loader: the
 * masquerade source of a flow leaving through that device. Zero = none. And how a packet leaves
 * through it: LB_DEV_F_PEER, a veth (netkit) whose peer is in another network namespace, so a tc
 * ingress program sends it with bpf_redirect_peer straight into the peer's ingress (what the device's
 * transmit would do, without the transmit and the peer's backlog queue). */
struct lb_dev_addr {
	__u32 v4[4];            /* IPv4-mapped */
	__u32 v6[4];
	__u32 flags;            /* LB_DEV_F_* */
};
#define LB_DEV_F_PEER (1 << 0)

/*
 * Connection tracking of the flows the tc programs translate. One tuple layout, as a packet shows it
 * on the wire: lb_ct is keyed by the client's packet (client -> frontend as dialled: a node address
 * for a NodePort), lb_nat by the backend's reply (backend -> the client, or -> the masquerade address
 * and port under SNAT). Both LRU: a flow that goes quiet is forgotten first.
 */
struct lb_ct_tuple {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8  proto;
	__u8  pad[3];
};

/* lb_ct_val.flags / lb_nat_val.flags */
#define LB_CT_F_SNAT     (1 << 0) /* masqueraded: nat_addr:nat_port is the source the backend sees */
#define LB_CT_F_LOCAL    (1 << 1) /* backend is a local pod: delivered to ifindex_out */
#define LB_CT_F_REPLIED  (1 << 2) /* a reply was seen */
#define LB_CT_F_CLOSING  (1 << 3) /* TCP FIN or RST seen: short timeout, a new SYN starts a new flow */
#define LB_CT_F_NODEPORT (1 << 4) /* the frontend is the wildcard NodePort one */
#define LB_CT_F_RST      (1 << 5) /* a TCP RST seen (either way): neither end keeps a socket for the tuple */
#define LB_CT_F_ENDED    (1 << 6) /* lb_ct only: the flow is over and its masquerade port went to another
				   * flow; never live again, kept where it is for a new flow on its tuple
				   * to rewrite (a delete and a later insert cost two LRU list operations) */

struct lb_ct_val {
	__u32 backend[4];
	__u32 nat_addr[4];      /* masquerade source (LB_CT_F_SNAT) */
	__u16 backend_port;
	__u16 nat_port;
	__u32 backend_id;
	__u32 rev_nat_id;
	__u32 ifindex_in;       /* device the flow arrived on: replies leave through it */
	__u32 ifindex_out;      /* local backend's host veth (LB_CT_F_LOCAL) */
	__u16 slot;             /* where backend_id sat: the flow holds while it still sits there */
	__u16 flags;            /* LB_CT_F_* */
	__u8  mac[6];           /* local backend's MAC (from lb_endpoints) */
	__u16 pad;
	__u64 created_ns;       /* bpf_ktime_get_boot_ns() */
	__u64 last_ns;
};

struct lb_nat_val {
	__u32 client[4];        /* what the reply's destination becomes */
	__u32 frontend[4];      /* what the reply's source becomes */
	__u16 client_port;
	__u16 frontend_port;
	__u32 ifindex_in;       /* where the reply goes out */
	__u16 flags;            /* LB_CT_F_* of the flow */
	__u16 gen;              /* flags, gen and rev_nat_id: the 64-bit word a program takes the entry
				 * with (bpf/tc_lb.c nat_lock); gen is odd while one holds it, every hold
				 * adds 2. (flags sits at an offset that is a multiple of 8.) */
	__u32 rev_nat_id;
	__u64 last_ns;
};

#endif /* BPFLB_LB_STRUCTS_H */
