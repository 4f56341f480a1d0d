/* Grove slot dataplane: two tc programs (clsact, direct action) per slot.
 *
 *   grove_egress   on the tap's tc ingress: frames the guest sent.
 *   grove_ingress  on the slot-side veth's tc ingress: frames for the guest.
 *
 * Stateless 1:1 NAT between the guest's fixed address (same in every clone) and
 * the slot's unique address, with checksum fix-ups; egress policy (CIDR LPM trie,
 * resolver-learnt addresses, default action); DNS only to the slot's resolver;
 * token-bucket rate limits per direction; counters; a ring buffer of denials;
 * port exposure (slot address:host port <-> guest port).
 *
 * Helpers used (all in Linux 5.8 or older, so Debian's 6.1 verifier accepts them):
 * bpf_map_lookup_elem, bpf_skb_load_bytes, bpf_skb_store_bytes,
 * bpf_l3_csum_replace, bpf_l4_csum_replace, bpf_csum_diff, bpf_redirect,
 * bpf_ktime_get_ns, bpf_spin_lock/unlock, bpf_ringbuf_reserve/submit. No kfuncs,
 * no bpf_loop, no tcx: attachment is the netlink cls_bpf of every kernel since 4.5.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "slot.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct slot_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__type(key, struct lpm_key);
	__type(value, struct cidr_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct dyn_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dyn_allow SEC(".maps");

/* (proto, slot port) -> guest port, and (proto, guest port) -> slot port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct port_key);
	__type(value, struct port_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} expose SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct port_key);
	__type(value, struct port_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} expose_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct bucket);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} rate SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NUM_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} denials SEC(".maps");

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ETH_HLEN_ 14

static __always_inline void count(__u32 idx, __u64 v)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &idx);
	if (c)
		*c += v;
}

static __always_inline int drop(__u32 dir, __u32 reason)
{
	count(dir * STRIDE + C_DROPS + reason, 1);
	return TC_ACT_SHOT;
}

static __always_inline int deny_logged(__u32 dir, __u32 reason, __u32 addr, __u16 port,
				       __u8 proto, __u32 rule_id)
{
	struct denial *d = bpf_ringbuf_reserve(&denials, sizeof(*d), 0);
	if (d) {
		d->ts_ns = bpf_ktime_get_ns();
		d->addr = addr;
		d->rule_id = rule_id;
		d->port = port;
		d->proto = proto;
		d->reason = reason;
		d->dir = dir;
		d->pad[0] = d->pad[1] = d->pad[2] = 0;
		bpf_ringbuf_submit(d, 0);
	} else {
		count(C_LOG_LOST, 1);
	}
	return drop(dir, reason);
}

/* Policy verdict for a remote address. Precedence: an explicit CIDR deny (the
 * longest matching prefix says deny) beats a resolver-learnt allow, which beats
 * a CIDR allow, which beats the default. */
static __always_inline int policy(const struct slot_cfg *c, __u32 addr, __u32 *rule)
{
	struct lpm_key k = { .prefixlen = 32, .addr = addr };
	struct cidr_val *cv = bpf_map_lookup_elem(&cidr, &k);
	if (cv && cv->action == ACT_DENY) {
		*rule = cv->rule_id;
		return ACT_DENY;
	}
	struct dyn_val *dv = bpf_map_lookup_elem(&dyn_allow, &addr);
	if (dv && dv->expires_ns > bpf_ktime_get_ns()) {
		*rule = dv->rule_id;
		return ACT_ALLOW;
	}
	if (cv) {
		*rule = cv->rule_id;
		return cv->action;
	}
	*rule = RULE_DEFAULT;
	return c->default_allow ? ACT_ALLOW : ACT_DENY;
}

/* Token bucket: 1 if `len` bytes may pass in direction `dir`. */
static __always_inline int rate_ok(__u32 dir, __u64 len)
{
	struct bucket *b = bpf_map_lookup_elem(&rate, &dir);
	int ok = 1;
	if (!b)
		return 1;
	/* No helper calls while the lock is held (verifier rule). */
	__u64 now = bpf_ktime_get_ns();
	bpf_spin_lock(&b->lock);
	if (b->rate_bps) {
		/* Tokens are kept in byte-nanoseconds (bytes x 1e9) so that refills
		 * between close packets are not truncated away. Bounds (userspace):
		 * rate_bps <= 1e10, burst <= 1 GiB: no overflow below 1 s. */
		__u64 cap = b->burst * 1000000000ULL;
		__u64 elapsed = now - b->last_ns;
		b->last_ns = now;
		if (elapsed >= 1000000000ULL) {
			b->tokens = cap;
		} else {
			__u64 t = b->tokens + elapsed * b->rate_bps;
			b->tokens = t > cap ? cap : t;
		}
		__u64 need = len * 1000000000ULL;
		if (b->tokens >= need)
			b->tokens -= need;
		else
			ok = 0;
	}
	bpf_spin_unlock(&b->lock);
	return ok;
}

/* A parsed IPv4 packet: offsets and the L4 fields the programs need. */
struct pkt {
	__u32 l4_off;   /* offset of the L4 header (first fragment only) */
	__u32 saddr;
	__u32 daddr;
	__u16 sport;    /* network order, 0 when not TCP/UDP or not first fragment */
	__u16 dport;
	__u16 l4_csum;  /* UDP checksum as found (0 = none) */
	__u8 proto;
	__u8 first;     /* 1 for an unfragmented packet or a first fragment */
	__u8 has_ports; /* TCP or UDP with its header present */
	__u8 icmp_type;
};

static __always_inline __u32 csum_off(const struct pkt *p)
{
	if (p->proto == IPPROTO_TCP)
		return p->l4_off + 16;
	if (p->proto == IPPROTO_UDP)
		return p->l4_off + 6;
	return p->l4_off + 2; /* ICMP */
}

/* Parses and validates the IPv4 header at ETH_HLEN: version, IHL, total length
 * within the frame, header checksum; then the TCP/UDP ports or the ICMP type of
 * a first fragment. Returns 0 or -1 (malformed). */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	__u8 hdr[60];
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, hdr, 20) < 0)
		return -1;
	struct iphdr *ip = (struct iphdr *)hdr;
	if (ip->version != 4)
		return -1;
	__u32 hlen = ip->ihl * 4;
	if (hlen < 20 || hlen > 60)
		return -1;
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || tot > skb->len - ETH_HLEN_)
		return -1;
	if (hlen > 20 && bpf_skb_load_bytes(skb, ETH_HLEN_ + 20, hdr + 20, hlen - 20) < 0)
		return -1;
	/* The header checksum over a valid header sums to 0xffff. */
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)hdr, hlen, 0);
	if (sum < 0)
		return -1;
	__u32 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	if (s != 0xffff)
		return -1;

	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->l4_off = ETH_HLEN_ + hlen;
	__u16 frag = bpf_ntohs(ip->frag_off);
	p->first = (frag & IP_OFFSET) == 0;
	p->has_ports = 0;
	p->sport = p->dport = 0;
	p->l4_csum = 0;
	p->icmp_type = 0;
	if (!p->first)
		return 0;
	__u32 l4_len = tot - hlen;
	if (p->proto == IPPROTO_TCP) {
		__u8 th[20];
		if (l4_len < 20 || bpf_skb_load_bytes(skb, p->l4_off, th, 20) < 0)
			return -1;
		if ((th[12] >> 4) < 5)
			return -1;
		__builtin_memcpy(&p->sport, th, 2);
		__builtin_memcpy(&p->dport, th + 2, 2);
		p->has_ports = 1;
	} else if (p->proto == IPPROTO_UDP) {
		__u8 uh[8];
		if (l4_len < 8 || bpf_skb_load_bytes(skb, p->l4_off, uh, 8) < 0)
			return -1;
		__builtin_memcpy(&p->sport, uh, 2);
		__builtin_memcpy(&p->dport, uh + 2, 2);
		__builtin_memcpy(&p->l4_csum, uh + 6, 2);
		p->has_ports = 1;
	} else if (p->proto == IPPROTO_ICMP) {
		__u8 ih[4];
		if (l4_len < 4 || bpf_skb_load_bytes(skb, p->l4_off, ih, 4) < 0)
			return -1;
		p->icmp_type = ih[0];
	}
	return 0;
}

/* Replaces the 4-byte address at `addr_off` (from -> to), fixing the IPv4 header
 * checksum and, on a first fragment, the TCP/UDP checksum (pseudo-header). An UDP
 * checksum of 0 (none) stays 0. A bad checksum stays bad: the update is
 * incremental. */
static __always_inline int nat_addr(struct __sk_buff *skb, const struct pkt *p,
				    __u32 addr_off, __u32 from, __u32 to)
{
	if (p->first && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)) {
		__u64 flags = BPF_F_PSEUDO_HDR | sizeof(to);
		if (p->proto == IPPROTO_UDP)
			flags |= BPF_F_MARK_MANGLED_0;
		if (p->proto == IPPROTO_TCP || p->l4_csum)
			if (bpf_l4_csum_replace(skb, csum_off(p), from, to, flags) < 0)
				return -1;
	}
	if (bpf_l3_csum_replace(skb, ETH_HLEN_ + offsetof(struct iphdr, check), from, to,
				sizeof(to)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &to, sizeof(to), 0) < 0)
		return -1;
	return 0;
}

/* Replaces a TCP/UDP port at `port_off` (from -> to), fixing the L4 checksum. */
static __always_inline int nat_port(struct __sk_buff *skb, const struct pkt *p,
				    __u32 port_off, __u16 from, __u16 to)
{
	if (p->proto == IPPROTO_TCP || p->l4_csum) {
		__u64 flags = sizeof(to);
		if (p->proto == IPPROTO_UDP)
			flags |= BPF_F_MARK_MANGLED_0;
		if (bpf_l4_csum_replace(skb, csum_off(p), from, to, flags) < 0)
			return -1;
	}
	if (bpf_skb_store_bytes(skb, port_off, &to, sizeof(to), 0) < 0)
		return -1;
	return 0;
}

static __always_inline int set_macs(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	__u8 macs[12];
	__builtin_memcpy(macs, dst, 6);
	__builtin_memcpy(macs + 6, src, 6);
	return bpf_skb_store_bytes(skb, 0, macs, 12, 0);
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] &&
	       a[5] == b[5];
}

SEC("classifier")
int grove_egress(struct __sk_buff *skb)
{
	const __u32 dir = DIR_EGRESS;
	__u32 zero = 0;
	struct slot_cfg *c = bpf_map_lookup_elem(&cfg, &zero);
	if (!c || !c->enabled)
		return drop(dir, R_UNCONFIGURED);

	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return drop(dir, R_MALFORMED);
	if (eth.h_proto == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK; /* the slot namespace answers for the gateway */
	if (eth.h_proto == bpf_htons(ETH_P_IPV6))
		return drop(dir, R_IPV6);
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return drop(dir, R_NOT_IP);
	if (!mac_eq(eth.h_source, c->guest_mac))
		return drop(dir, R_SPOOF);

	struct pkt p;
	if (parse_ipv4(skb, &p) < 0)
		return drop(dir, R_MALFORMED);
	if (p.saddr != c->guest_ip)
		return drop(dir, R_SPOOF);
	if (p.daddr == c->gw_ip)
		return TC_ACT_OK; /* the resolver (and only it) lives there */

	if (p.has_ports && p.dport == bpf_htons(53))
		return deny_logged(dir, R_DNS, p.daddr, p.dport, p.proto, RULE_DNS);

	__u32 rule;
	if (policy(c, p.daddr, &rule) != ACT_ALLOW)
		return deny_logged(dir, R_POLICY, p.daddr, p.dport, p.proto, rule);

	if (!rate_ok(dir, skb->len))
		return drop(dir, R_RATE);

	/* Exposed guest ports answer from their slot port. */
	if (p.has_ports) {
		struct port_key k = { .proto = p.proto, .port = p.sport };
		struct port_val *v = bpf_map_lookup_elem(&expose_rev, &k);
		if (v && nat_port(skb, &p, p.l4_off, p.sport, v->port) < 0)
			return drop(dir, R_MALFORMED);
	}
	if (nat_addr(skb, &p, ETH_HLEN_ + offsetof(struct iphdr, saddr), c->guest_ip,
		     c->slot_ip) < 0)
		return drop(dir, R_MALFORMED);
	if (set_macs(skb, c->host_mac, c->veth_mac) < 0)
		return drop(dir, R_MALFORMED);

	count(dir * STRIDE + C_PKTS, 1);
	count(dir * STRIDE + C_BYTES, skb->len);
	return bpf_redirect(c->veth_ifindex, 0);
}

/* An ICMP error quotes the packet that caused it: the guest's packet left with
 * the slot address as its source, so the quoted header is translated back too
 * (its source address and header checksum, and the ICMP checksum over both). */
static __always_inline int nat_icmp_quote(struct __sk_buff *skb, const struct pkt *p,
					  const struct slot_cfg *c)
{
	__u32 in_off = p->l4_off + 8;
	struct iphdr inner;
	if (bpf_skb_load_bytes(skb, in_off, &inner, sizeof(inner)) < 0)
		return 0; /* nothing quoted: leave it */
	if (inner.version != 4 || inner.saddr != c->slot_ip)
		return 0;
	__u32 from = c->slot_ip, to = c->guest_ip;
	__u32 icmp_csum = p->l4_off + 2;
	__u32 check_off = in_off + offsetof(struct iphdr, check);
	__u16 old_check = inner.check;
	if (bpf_l3_csum_replace(skb, check_off, from, to, sizeof(to)) < 0)
		return -1;
	__u16 new_check;
	if (bpf_skb_load_bytes(skb, check_off, &new_check, 2) < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, icmp_csum, old_check, new_check, 2) < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, icmp_csum, from, to, 4) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, in_off + offsetof(struct iphdr, saddr), &to, 4, 0);
}

SEC("classifier")
int grove_ingress(struct __sk_buff *skb)
{
	const __u32 dir = DIR_INGRESS;
	__u32 zero = 0;
	struct slot_cfg *c = bpf_map_lookup_elem(&cfg, &zero);
	if (!c || !c->enabled)
		return drop(dir, R_UNCONFIGURED);

	struct ethhdr eth;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return drop(dir, R_MALFORMED);
	if (eth.h_proto == bpf_htons(ETH_P_ARP))
		return TC_ACT_OK; /* the slot namespace answers for the slot address */
	if (eth.h_proto == bpf_htons(ETH_P_IPV6))
		return drop(dir, R_IPV6);
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return drop(dir, R_NOT_IP);

	struct pkt p;
	if (parse_ipv4(skb, &p) < 0)
		return drop(dir, R_MALFORMED);
	if (p.daddr != c->slot_ip)
		return TC_ACT_OK; /* for the slot namespace itself, which forwards nothing */

	/* Inbound is admitted to an exposed port, or from an address the guest may
	 * reach (replies); nothing else. */
	int exposed = 0;
	struct port_val guest_port = {};
	if (p.has_ports) {
		struct port_key k = { .proto = p.proto, .port = p.dport };
		struct port_val *v = bpf_map_lookup_elem(&expose, &k);
		if (v) {
			exposed = 1;
			guest_port = *v;
		}
	}
	__u32 rule;
	if (!exposed && policy(c, p.saddr, &rule) != ACT_ALLOW)
		return deny_logged(dir, R_POLICY, p.saddr, p.sport, p.proto, rule);

	if (!rate_ok(dir, skb->len))
		return drop(dir, R_RATE);

	if (exposed && nat_port(skb, &p, p.l4_off + 2, p.dport, guest_port.port) < 0)
		return drop(dir, R_MALFORMED);
	if (p.first && p.proto == IPPROTO_ICMP &&
	    (p.icmp_type == ICMP_DEST_UNREACH || p.icmp_type == ICMP_TIME_EXCEEDED ||
	     p.icmp_type == ICMP_PARAMETERPROB))
		if (nat_icmp_quote(skb, &p, c) < 0)
			return drop(dir, R_MALFORMED);
	if (nat_addr(skb, &p, ETH_HLEN_ + offsetof(struct iphdr, daddr), c->slot_ip,
		     c->guest_ip) < 0)
		return drop(dir, R_MALFORMED);
	if (set_macs(skb, c->guest_mac, c->tap_mac) < 0)
		return drop(dir, R_MALFORMED);

	count(dir * STRIDE + C_PKTS, 1);
	count(dir * STRIDE + C_BYTES, skb->len);
	return bpf_redirect(c->tap_ifindex, 0);
}
