/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The pinned maps both programs (sock_lb.c, tc_lb.c) read, declared once. Whichever program is
 * compiled first creates and pins them under PIN_ROOT; the other opens the pins (same -D sizes).
 * Sizes come from lb/settings.py MapSizes through the loader (lb/maps/structs.py MAPS names the macro).
 */
#ifndef BPFLB_LB_MAPS_H
#define BPFLB_LB_MAPS_H

#include "lb_structs.h"

#define PIN(name) PIN_ROOT "/" #name

/* Datapath reads only slots 1..master.count; the agent writes in make-before-break order. */
BPF_TABLE_PINNED("hash", struct lb_svc_key, struct lb_svc_val, lb_services_v1, SVC_MAP_SIZE, PIN(lb_services_v1));
BPF_TABLE_PINNED("hash", __u32, struct lb_backend, lb_backends_v1, BACKEND_MAP_SIZE, PIN(lb_backends_v1));
BPF_TABLE_PINNED("hash", __u32, struct lb_revnat, lb_revnat_v1, REVNAT_MAP_SIZE, PIN(lb_revnat_v1));
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_val, lb_affinity_v1, AFFINITY_MAP_SIZE, PIN(lb_affinity_v1));
/* Local pod endpoints: written by the CNI plugin (through the agent), read by tc to reach a local backend. */
BPF_TABLE_PINNED("hash", struct lb_endpoint_key, struct lb_endpoint, lb_endpoints_v1, ENDPOINT_MAP_SIZE, PIN(lb_endpoints_v1));
/* The node's addresses serving NodePorts (agent, --nodeport-addresses). */
BPF_TABLE_PINNED("hash", struct lb_node_addr_key, struct lb_node_addr, lb_node_addrs_v1, NODE_ADDR_MAP_SIZE, PIN(lb_node_addrs_v1));
/* loadBalancerSourceRanges (agent). */
BPF_TABLE_PINNED("lpm_trie", struct lb_src_range_key, struct lb_src_range, lb_src_ranges_v1, SRC_RANGE_MAP_SIZE, PIN(lb_src_ranges_v1), BPF_F_NO_PREALLOC);
/* tc: sessionAffinity of outside clients, by their address. */
BPF_TABLE_PINNED("lru_hash", struct lb_ext_affinity_key, struct lb_affinity_val, lb_ext_affinity_v1, EXT_AFFINITY_MAP_SIZE, PIN(lb_ext_affinity_v1));
/* tc: conntrack (client's direction) and its reverse (backend's replies, masquerade ports). */
BPF_TABLE_PINNED("lru_hash", struct lb_ct_tuple, struct lb_ct_val, lb_ct_v1, CT_MAP_SIZE, PIN(lb_ct_v1));
BPF_TABLE_PINNED("lru_hash", struct lb_ct_tuple, struct lb_nat_val, lb_nat_v1, NAT_MAP_SIZE, PIN(lb_nat_v1));
/* tc: each device's own addresses, the masquerade source (written by the loader; not sized by a setting). */
BPF_TABLE_PINNED("hash", __u32, struct lb_dev_addr, lb_dev_addrs_v1, 1024, PIN(lb_dev_addrs_v1));

#endif /* BPFLB_LB_MAPS_H */
