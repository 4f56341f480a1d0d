/* Shared layout of the slot dataplane's maps and events.
 *
 * Every struct here has a #[repr(C)] mirror in netd/src/dataplane/maps.rs; the
 * userspace side checks the sizes at compile time. Addresses and ports are kept
 * in network byte order, as they appear in packets.
 */
#ifndef GROVE_SLOT_H
#define GROVE_SLOT_H

#include <linux/types.h>

/* Direction, from the guest's point of view. */
#define DIR_EGRESS 0  /* guest -> world: tc ingress of the tap */
#define DIR_INGRESS 1 /* world -> guest: tc ingress of the slot-side veth */

/* Drop reasons (index into the per-direction drop counters). */
#define R_MALFORMED 0 /* truncated or invalid IPv4/L4 header, bad IPv4 header checksum */
#define R_SPOOF 1     /* source MAC/IPv4 is not the guest's */
#define R_IPV6 2      /* IPv6 is not routed (IPv4-only dataplane) */
#define R_NOT_IP 3    /* neither IPv4 nor ARP */
#define R_DNS 4       /* DNS to any server but the slot's resolver */
#define R_POLICY 5    /* CIDR/domain policy or the default action */
#define R_RATE 6      /* rate limit */
#define R_UNCONFIGURED 7 /* slot config missing or disabled */
#define NUM_REASONS 8

/* Counter layout: per direction, STRIDE u64s: packets, bytes, then drops[reason]. */
#define C_PKTS 0
#define C_BYTES 1
#define C_DROPS 2
#define STRIDE (2 + NUM_REASONS)
#define C_LOG_LOST (2 * STRIDE) /* denial events the ring buffer had no room for */
#define NUM_COUNTERS (2 * STRIDE + 1)

/* Rule ids reported in denials: 0 = the default action, CIDR rules and domain
 * rules carry the id userspace gave them, these are fixed. */
#define RULE_DEFAULT 0
#define RULE_DNS 0xfffffff0

#define ACT_DENY 0
#define ACT_ALLOW 1

struct slot_cfg {
	__u32 guest_ip;   /* the guest's fixed in-guest address */
	__u32 slot_ip;    /* the slot's unique address (slot-side veth) */
	__u32 gw_ip;      /* gateway and resolver address, on the tap */
	__u32 tap_ifindex;
	__u32 veth_ifindex;
	__u8 guest_mac[6];
	__u8 tap_mac[6];
	__u8 veth_mac[6];
	__u8 host_mac[6]; /* host-side veth */
	__u8 default_allow;
	__u8 enabled;
	__u8 pad[6];
};

struct lpm_key {
	__u32 prefixlen;
	__u32 addr;
};

struct cidr_val {
	__u32 rule_id;
	__u8 action;
	__u8 pad[3];
};

/* An address learnt by the slot's resolver, allowed until expires_ns
 * (CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns). */
struct dyn_val {
	__u64 expires_ns;
	__u32 rule_id;
	__u32 pad;
};

struct port_key {
	__u8 proto;
	__u8 pad;
	__u16 port;
};

struct port_val {
	__u16 port;
	__u16 pad;
};

/* Token bucket, one per direction. rate_bps == 0 means unlimited. */
struct bucket {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 rate_bps; /* bytes per second */
	__u64 burst;    /* bytes */
	__u64 tokens;   /* bytes x 1e9 */
	__u64 last_ns;
};

struct denial {
	__u64 ts_ns;
	__u32 addr; /* the remote address (destination on egress, source on ingress) */
	__u32 rule_id;
	__u16 port; /* remote port, 0 when there is none (ICMP, later fragments) */
	__u8 proto;
	__u8 reason;
	__u8 dir;
	__u8 pad[3];
};

#endif
