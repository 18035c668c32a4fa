// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
//
// kxp's XDP steering program: hands to the AF_XDP socket of the receiving queue only the
// frames kxp owns, and lets the kernel have everything else (XDP_PASS): ARP and ND,
// traffic to the node itself, pod-to-pod traffic, anything that is not a service.
//
// kxp owns, by destination (for ICMP errors: by the quoted packet, turned around):
//   1. a service frontend: (address, protocol, port) in `frontends` (ClusterIP,
//      ExternalIP, LoadBalancer IP, node address + NodePort);
//   2. any TCP/UDP/SCTP port of a ClusterIP (`vips` flag VIP_ANY_PORT: kxp rejects
//      unknown ports as kube-proxy does) and any address in a service CIDR
//      (`service_cidrs`: kxp drops unallocated ones);
//   3. replies of masqueraded flows: a node address (`node_addrs`) and a destination
//      port in the SNAT range (`snat_ranges[MAX_QUEUES]`); a port no worker owns
//      (`snat_owner`) is dropped and counted (STAT_SNAT_UNOWNED: the kernel must not
//      answer it with a reset);
//   4. replies of flows kxp translated without masquerading (a pod's connection to a
//      ClusterIP, external traffic under externalTrafficPolicy Local): the exact reply
//      tuple in `reply_table`, a hash table the workers write directly through a shared
//      mapping (no system call per flow; see "Reply table" below), or, for the rare
//      tuple that finds no free slot there, in the LRU map `replies`, which the workers
//      write in batches;
//   5. fragments addressed to a service address (kxp drops and counts them).
//
// Ownership. Conntrack is per worker and AF_XDP can only deliver a frame to the socket of
// the queue it arrived on, so with several workers a frame may reach a worker that does
// not hold its flow. The program tells the receiving worker who does: every redirected
// frame carries 8 bytes of XDP metadata (bpf_xdp_adjust_meta; copy-mode AF_XDP copies
// them into the UMEM right in front of the frame): KXP_META_MAGIC and the owning worker's
// index, or KXP_NO_OWNER when any worker may take it (a new flow). The owner of
//   * a masqueraded reply is the worker whose SNAT share holds the port (`snat_owner`);
//   * a reply of an unmasqueraded flow is the owner of its tuple in `reply_table` (or
//     `replies`);
//   * a later frame of a flow in the original direction is the owner of its (wire)
//     tuple there (the workers insert the original tuple of each new flow too when
//     there are several of them);
//   * anything else is nobody's yet (KXP_NO_OWNER).
// The worker hands frames it does not own to their owner (driver/afxdp/handoff.rs).
// STAT_OTHER_OWNER counts frames steered to a queue whose worker (`queue_workers`) is not
// their owner, i.e. frames that userspace must hand over.
//
// Reply tables. Two array maps of buckets (BPF_F_MMAPABLE), one for IPv4 tuples (16-byte
// slots) and one for the others (48-byte slots), that userspace maps and writes with
// atomic operations; this program only reads them. A bucket is REPLY_WAYS slots: its
// first cache line holds every slot's state and a 32-bit fingerprint of its tuple, the
// rest the slots' owners and tuples, so a lookup reads one line per bucket and a tuple
// only when its fingerprint matches. A tuple lives in one of two buckets picked by a
// seeded hash (tuple_hash, mirrored in reply_table.rs, as are the fingerprint and the
// bucket choice; seed and bucket counts in `reply_cfg`). A slot's state is
// generation << 2 | tag, tag 0 free, 1 being written, 2 valid; writers claim a slot by
// compare-and-swap to tag 1, write, then publish tag 2 with the next generation. A reader
// takes a slot only if its state is valid and reads the same before and after the tuple
// and owner (x86 keeps loads in order; the compiler is held by volatile reads), so a slot
// rewritten under it is never mistaken for a match.
//
// Self-contained (no system headers) so that any clang with the BPF target builds it.
// Compiled by dataplane/build.rs; loaded, filled and attached by
// dataplane/src/driver/afxdp/steer.rs, which mirrors every layout below.

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name
#define __always_inline inline __attribute__((always_inline))

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define bpf_htons(x) __builtin_bswap16(x)
#define bpf_ntohs(x) __builtin_bswap16(x)
#define bpf_htonl(x) __builtin_bswap32(x)
#else
#define bpf_htons(x) (x)
#define bpf_ntohs(x) (x)
#define bpf_htonl(x) (x)
#endif

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)51;
struct xdp_md;
static long (*bpf_xdp_adjust_meta)(struct xdp_md *ctx, int delta) = (void *)54;

enum { XDP_ABORTED = 0, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT };
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_LPM_TRIE = 11,
	BPF_MAP_TYPE_XSKMAP = 17,
};
#define BPF_F_NO_PREALLOC 1
#define BPF_F_MMAPABLE (1U << 10)

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

// Limits, mirrored in steer.rs.
#define MAX_QUEUES 64
#define MAX_IFACE_SLOTS 256

// An address as 16 bytes: IPv6 as is, IPv4 as ::ffff:a.b.c.d.
struct addr {
	__u32 w[4];
};

struct frontend_key {
	struct addr addr;
	__u16 port_be;
	__u8 proto;
	__u8 pad;
};

struct tuple_key {
	struct addr src;
	struct addr dst;
	__u16 sport_be;
	__u16 dport_be;
	__u8 proto;
	__u8 pad[3];
};

struct lpm_key {
	__u32 prefixlen;
	struct addr addr;
};

// Host byte order, inclusive; hi < lo means "none".
struct port_range {
	__u16 lo;
	__u16 hi;
};

#define VIP_ANY_PORT 1 // a ClusterIP: every TCP/UDP/SCTP port goes to kxp
#define VIP_SERVICE 2  // a service address: fragments to it go to kxp

enum stat {
	STAT_FRAMES,
	STAT_PASS,
	STAT_FRONTEND,
	STAT_SERVICE_CIDR,
	STAT_SNAT_REPLY,
	STAT_REPLY,
	STAT_ICMP_ERROR,
	STAT_FRAGMENT,
	STAT_SNAT_UNOWNED,
	STAT_NO_SOCKET,
	STAT_OTHER_OWNER,
	STAT_NO_META,
	STAT_MAX,
};

// XDP metadata in front of every redirected frame (mirrored in afxdp.rs).
#define KXP_META_MAGIC 0x6b787031 // "kxp1"
#define KXP_NO_OWNER 0xffffffff
struct kxp_meta {
	__u32 magic;
	__u32 owner;
};

// Socket of (interface slot, queue) at slot * MAX_QUEUES + queue.
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_IFACE_SLOTS *MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

// ifindex -> interface slot.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IFACE_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} if_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct frontend_key);
	__type(value, __u8);
} frontends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr);
	__type(value, __u8);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
} service_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct addr);
	__type(value, __u8);
} node_addrs SEC(".maps");

// Index MAX_QUEUES: the whole SNAT range (every worker's share).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_QUEUES + 1);
	__type(key, __u32);
	__type(value, struct port_range);
} snat_ranges SEC(".maps");

// SNAT port (host order) -> owning worker index + 1 (0: nobody).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} snat_owner SEC(".maps");

// Receive queue -> index + 1 of the worker bound to it (0: none). Counting only.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} queue_workers SEC(".maps");

// Tuples of translated flows as they arrive on the wire -> owning worker index: reply
// tuples of flows kxp translated without masquerading (what steers them here), and, with
// several workers, original tuples of every flow (what finds their owner).
// LRU: a full map evicts the stalest tuple rather than refusing a new flow's.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct tuple_key);
	__type(value, __u32);
} replies SEC(".maps");

// Reply tables (see above): IPv4 tuples in `reply_table_v4`, whose 16-byte slots hold
// the tuple's 13 bytes and the owner, the others in `reply_table`. Sized by userspace
// before the program is loaded.
#define REPLY_WAYS 8
#define SLOT_FREE 0
#define SLOT_BUSY 1
#define SLOT_VALID 2
struct reply_slot_v4 {
	__u32 src; // as in the frame
	__u32 dst;
	__u32 ports; // sport_be, dport_be
	__u32 meta; // proto | owner << 8
};

// 192 bytes: one line of states and fingerprints, two of slots.
struct reply_bucket_v4 {
	__u32 state[REPLY_WAYS];
	__u32 fp[REPLY_WAYS];
	struct reply_slot_v4 slot[REPLY_WAYS];
};

struct reply_slot {
	__u32 owner;
	__u32 pad;
	struct tuple_key key;
};

// 448 bytes: one line of states and fingerprints, six of slots.
struct reply_bucket {
	__u32 state[REPLY_WAYS];
	__u32 fp[REPLY_WAYS];
	struct reply_slot slot[REPLY_WAYS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct reply_bucket_v4);
} reply_table_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct reply_bucket);
} reply_table SEC(".maps");

// Buckets of each table (0: the tables are off) and the hash seed, written once before
// attach.
struct reply_cfg {
	__u32 buckets_v4;
	__u32 buckets_v6;
	__u32 flags; // REPLY_CFG_OWNERS: several workers, find owners of original tuples
	__u32 pad;
	__u64 seed;
};
#define REPLY_CFG_OWNERS 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct reply_cfg);
} reply_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&stats, &which);
	if (c)
		*c += 1;
}

static __always_inline void addr_v4(struct addr *a, __u32 be)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = be;
}

static __always_inline void addr_v6(struct addr *a, const __u8 *p)
{
	__builtin_memcpy(a, p, 16);
}

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define IPPROTO_SCTP 132

static __always_inline int is_transport(__u8 p)
{
	return p == IPPROTO_TCP || p == IPPROTO_UDP || p == IPPROTO_SCTP;
}

static __always_inline int is_service_addr(const struct addr *dst, __u8 flag)
{
	__u8 *v = bpf_map_lookup_elem(&vips, dst);
	if (v && (*v & flag))
		return 1;
	struct lpm_key k = { .prefixlen = 128, .addr = *dst };
	return bpf_map_lookup_elem(&service_cidrs, &k) != 0;
}

#define READ_ONCE_U32(x) (*(volatile __u32 *)&(x))

// One round of the seeded tuple hash: a pair of 32-bit words mixed in.
static __always_inline __u64 hash_pair(__u64 h, __u32 a, __u32 b)
{
	__u64 v = (__u64)a | ((__u64)b << 32);
	h = (h ^ v) * 0x9e3779b97f4a7c15ULL;
	return h ^ (h >> 29);
}

static __always_inline __u64 hash_finish(__u64 h)
{
	h ^= h >> 32;
	h *= 0xd6e8feb86659fd93ULL;
	h ^= h >> 32;
	return h;
}

// Seeded hash of a tuple, as 32-bit words taken two at a time (mirrored in
// reply_table.rs): a multiply-xorshift round per pair, then a finaliser. An IPv4 tuple
// is the four words source, destination, ports, protocol; any other the ten words of
// `struct tuple_key` in memory order.
static __always_inline __u64 tuple_hash(const struct tuple_key *t, __u64 seed)
{
	const __u32 *w = (const __u32 *)t;
	__u64 h = seed;
#pragma unroll
	for (int i = 0; i < 10; i += 2)
		h = hash_pair(h, w[i], w[i + 1]);
	return hash_finish(h);
}

static __always_inline __u64 tuple_hash_v4(const struct tuple_key *t, __u64 seed)
{
	const __u32 *w = (const __u32 *)t;
	__u64 h = hash_pair(seed, w[3], w[7]);
	h = hash_pair(h, w[8], t->proto);
	return hash_finish(h);
}

// Both addresses IPv4-mapped: the tuple lives in `reply_table_v4`.
static __always_inline int is_v4_tuple(const struct tuple_key *t)
{
	const __u32 *w = (const __u32 *)t;
	__u32 mapped = bpf_htonl(0x0000ffff);
	return (w[0] | w[1] | w[4] | w[5]) == 0 && w[2] == mapped && w[6] == mapped;
}

static __always_inline int same_tuple(const struct tuple_key *a, const struct tuple_key *b)
{
	const __u32 *x = (const __u32 *)a;
	const __u32 *y = (const __u32 *)b;
	__u32 d = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		d |= x[i] ^ y[i];
	return d == 0;
}

// The owner of `t` (fingerprint `fp`) in one bucket of the reply table, or KXP_NO_OWNER.
static __always_inline __u32 bucket_owner(__u32 b, __u32 fp, const struct tuple_key *t)
{
	struct reply_bucket *bk = bpf_map_lookup_elem(&reply_table, &b);
	if (!bk)
		return KXP_NO_OWNER;
#pragma unroll
	for (int j = 0; j < REPLY_WAYS; j++) {
		__u32 s1 = READ_ONCE_U32(bk->state[j]);
		if ((s1 & 3) != SLOT_VALID || READ_ONCE_U32(bk->fp[j]) != fp)
			continue;
		if (!same_tuple(&bk->slot[j].key, t))
			continue;
		__u32 o = READ_ONCE_U32(bk->slot[j].owner);
		if (READ_ONCE_U32(bk->state[j]) == s1)
			return o;
	}
	return KXP_NO_OWNER;
}

// The owner of IPv4 tuple `t` (fingerprint `fp`) in one bucket of `reply_table_v4`, or
// KXP_NO_OWNER.
static __always_inline __u32 bucket_owner_v4(__u32 b, __u32 fp, const struct tuple_key *t)
{
	struct reply_bucket_v4 *bk = bpf_map_lookup_elem(&reply_table_v4, &b);
	if (!bk)
		return KXP_NO_OWNER;
	const __u32 *w = (const __u32 *)t;
#pragma unroll
	for (int j = 0; j < REPLY_WAYS; j++) {
		__u32 s1 = READ_ONCE_U32(bk->state[j]);
		if ((s1 & 3) != SLOT_VALID || READ_ONCE_U32(bk->fp[j]) != fp)
			continue;
		struct reply_slot_v4 *sl = &bk->slot[j];
		__u32 meta = READ_ONCE_U32(sl->meta);
		if ((READ_ONCE_U32(sl->src) ^ w[3]) | (READ_ONCE_U32(sl->dst) ^ w[7]) |
		    (READ_ONCE_U32(sl->ports) ^ w[8]) | ((meta & 0xff) ^ t->proto))
			continue;
		if (READ_ONCE_U32(bk->state[j]) == s1)
			return meta >> 8;
	}
	return KXP_NO_OWNER;
}

// The fingerprint of a tuple hash: bits the bucket choice does not use up.
static __always_inline __u32 fingerprint(__u64 h)
{
	return (__u32)(((h ^ (h >> 23)) * 0x2545f4914f6cdd1dULL) >> 32);
}

// Picks bucket `i` (0 or 1) of a hash: the high and the low 32 bits scaled to the
// bucket count (mirrored in reply_table.rs).
static __always_inline __u32 bucket_of(__u64 h, int i, __u32 buckets)
{
	__u64 x = i ? (h >> 32) : (h & 0xffffffffULL);
	return (__u32)((x * buckets) >> 32);
}

// The worker owning the flow of tuple `t` (see Ownership above): 1 and `*who` if the
// tuple is in the reply table or the LRU map, 0 if in neither.
static __always_inline int flow_owner(const struct tuple_key *t, __u32 *who)
{
	__u32 zero = 0;
	struct reply_cfg *c = bpf_map_lookup_elem(&reply_cfg, &zero);
	if (c && c->buckets_v4 && c->buckets_v6) {
		__u32 o;
		if (is_v4_tuple(t)) {
			__u64 h = tuple_hash_v4(t, c->seed);
			__u32 fp = fingerprint(h);
			o = bucket_owner_v4(bucket_of(h, 0, c->buckets_v4), fp, t);
			if (o == KXP_NO_OWNER)
				o = bucket_owner_v4(bucket_of(h, 1, c->buckets_v4), fp, t);
		} else {
			__u64 h = tuple_hash(t, c->seed);
			__u32 fp = fingerprint(h);
			o = bucket_owner(bucket_of(h, 0, c->buckets_v6), fp, t);
			if (o == KXP_NO_OWNER)
				o = bucket_owner(bucket_of(h, 1, c->buckets_v6), fp, t);
		}
		if (o != KXP_NO_OWNER) {
			*who = o;
			return 1;
		}
	}
	__u32 *o = bpf_map_lookup_elem(&replies, t);
	if (o) {
		*who = *o;
		return 1;
	}
	return 0;
}

// The worker owning the flow of tuple `t` if known. Only asked when there are several
// workers: with one, every frame is its own.
static __always_inline __u32 tuple_owner(struct tuple_key *t)
{
	__u32 zero = 0;
	struct reply_cfg *c = bpf_map_lookup_elem(&reply_cfg, &zero);
	__u32 who = KXP_NO_OWNER;
	if (!c || (c->flags & REPLY_CFG_OWNERS))
		flow_owner(t, &who);
	return who;
}

// Why a tuple belongs to kxp (a STAT_*), 0 if it does not, or STAT_SNAT_UNOWNED; and in
// `who` the owning worker (KXP_NO_OWNER: any).
static __always_inline __u32 owner(struct tuple_key *t, __u32 *who)
{
	*who = KXP_NO_OWNER;
	struct frontend_key fk = { .addr = t->dst, .port_be = t->dport_be, .proto = t->proto };
	if (bpf_map_lookup_elem(&frontends, &fk)) {
		*who = tuple_owner(t);
		return STAT_FRONTEND;
	}
	if (is_service_addr(&t->dst, VIP_ANY_PORT)) {
		*who = tuple_owner(t);
		return STAT_SERVICE_CIDR;
	}
	if (bpf_map_lookup_elem(&node_addrs, &t->dst)) {
		__u32 port = bpf_ntohs(t->dport_be);
		__u32 all = MAX_QUEUES;
		struct port_range *r = bpf_map_lookup_elem(&snat_ranges, &all);
		if (r && port >= r->lo && port <= r->hi) {
			__u32 *o = bpf_map_lookup_elem(&snat_owner, &port);
			if (!o || *o == 0)
				return STAT_SNAT_UNOWNED;
			*who = *o - 1;
			return STAT_SNAT_REPLY;
		}
	}
	if (flow_owner(t, who))
		return STAT_REPLY;
	return 0;
}

// Reads the ports of a TCP/UDP/SCTP header at `l4` into `t`; 0 if they are not there.
static __always_inline int ports(struct tuple_key *t, void *l4, void *end)
{
	__u16 *p = l4;
	if ((void *)(p + 2) > end)
		return 0;
	t->sport_be = p[0];
	t->dport_be = p[1];
	return 1;
}

// The packet an ICMP error quotes, turned around so that it reads like a packet of the
// same flow travelling the same way as the error. 0 if it cannot be read.
static __always_inline int quoted_v4(struct tuple_key *t, void *inner, void *end)
{
	__u8 *ip = inner;
	if ((void *)(ip + 20) > end)
		return 0;
	__u8 ihl = ip[0] & 0x0f;
	if ((ip[0] >> 4) != 4 || ihl < 5)
		return 0;
	if (!is_transport(ip[9]))
		return 0;
	struct tuple_key q = {};
	if (!ports(&q, ip + ihl * 4, end))
		return 0;
	addr_v4(&t->src, *(__u32 *)(ip + 16));
	addr_v4(&t->dst, *(__u32 *)(ip + 12));
	t->sport_be = q.dport_be;
	t->dport_be = q.sport_be;
	t->proto = ip[9];
	return 1;
}

static __always_inline int quoted_v6(struct tuple_key *t, void *inner, void *end)
{
	__u8 *ip = inner;
	if ((void *)(ip + 40) > end)
		return 0;
	if ((ip[0] >> 4) != 6 || !is_transport(ip[6]))
		return 0;
	struct tuple_key q = {};
	if (!ports(&q, ip + 40, end))
		return 0;
	addr_v6(&t->src, ip + 24);
	addr_v6(&t->dst, ip + 8);
	t->sport_be = q.dport_be;
	t->dport_be = q.sport_be;
	t->proto = ip[6];
	return 1;
}

static __always_inline int redirect(struct xdp_md *ctx, __u32 why, __u32 who)
{
	if (why == STAT_SNAT_UNOWNED) {
		count(STAT_SNAT_UNOWNED);
		return XDP_DROP;
	}
	count(why);
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *slot = bpf_map_lookup_elem(&if_slots, &ifindex);
	__u32 queue = ctx->rx_queue_index;
	if (!slot || queue >= MAX_QUEUES) {
		count(STAT_NO_SOCKET);
		return XDP_PASS;
	}
	__u32 s = *slot;
	if (who != KXP_NO_OWNER) {
		__u32 *w = bpf_map_lookup_elem(&queue_workers, &queue);
		if (w && *w != who + 1)
			count(STAT_OTHER_OWNER);
	}
	// Tell the worker who owns the frame (pointers are reloaded after the adjustment).
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct kxp_meta)) == 0) {
		struct kxp_meta *m = (void *)(long)ctx->data_meta;
		if ((void *)(m + 1) <= (void *)(long)ctx->data) {
			m->magic = KXP_META_MAGIC;
			m->owner = who;
		} else {
			count(STAT_NO_META);
		}
	} else {
		count(STAT_NO_META);
	}
	long r = bpf_redirect_map(&xsks, s * MAX_QUEUES + queue, XDP_PASS);
	if (r != XDP_REDIRECT)
		count(STAT_NO_SOCKET);
	return r;
}

SEC("xdp")
int kxp_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	count(STAT_FRAMES);

	__u8 *eth = data;
	if ((void *)(eth + 14) > end)
		goto pass;
	__u16 type = *(__u16 *)(eth + 12);
	void *l3 = eth + 14;
	if (type == bpf_htons(ETH_P_8021Q) || type == bpf_htons(ETH_P_8021AD)) {
		if (l3 + 4 > end)
			goto pass;
		type = *(__u16 *)(eth + 16);
		l3 = eth + 18;
	}

	struct tuple_key t = {};
	void *l4;
	int icmp_error = 0;
	if (type == bpf_htons(ETH_P_IP)) {
		__u8 *ip = l3;
		if ((void *)(ip + 20) > end)
			goto pass;
		__u8 ihl = ip[0] & 0x0f;
		if (ihl < 5)
			goto pass;
		addr_v4(&t.src, *(__u32 *)(ip + 12));
		addr_v4(&t.dst, *(__u32 *)(ip + 16));
		t.proto = ip[9];
		// More fragments, or an offset: no transport header to go by.
		if (*(__u16 *)(ip + 6) & bpf_htons(0x3fff)) {
			if (is_service_addr(&t.dst, VIP_SERVICE | VIP_ANY_PORT))
				return redirect(ctx, STAT_FRAGMENT, KXP_NO_OWNER);
			goto pass;
		}
		l4 = ip + ihl * 4;
		if (t.proto == IPPROTO_ICMP) {
			__u8 *icmp = l4;
			if ((void *)(icmp + 8) > end)
				goto pass;
			// Destination unreachable, time exceeded, parameter problem.
			if (icmp[0] != 3 && icmp[0] != 11 && icmp[0] != 12)
				goto pass;
			if (!quoted_v4(&t, icmp + 8, end))
				goto pass;
			icmp_error = 1;
		}
	} else if (type == bpf_htons(ETH_P_IPV6)) {
		__u8 *ip = l3;
		if ((void *)(ip + 40) > end)
			goto pass;
		addr_v6(&t.src, ip + 8);
		addr_v6(&t.dst, ip + 24);
		__u8 next = ip[6];
		__u8 *h = ip + 40;
		// Hop-by-hop, routing, destination options and fragment headers, a few deep.
#pragma unroll
		for (int i = 0; i < 4; i++) {
			if (next == 0 || next == 43 || next == 60) {
				if ((void *)(h + 8) > end)
					goto pass;
				next = h[0];
				h += (h[1] + 1) * 8;
			} else if (next == 44) {
				if ((void *)(h + 8) > end)
					goto pass;
				// Offset or more fragments: a real fragment.
				if (*(__u16 *)(h + 2) & bpf_htons(0xfff9)) {
					if (is_service_addr(&t.dst, VIP_SERVICE | VIP_ANY_PORT))
						return redirect(ctx, STAT_FRAGMENT, KXP_NO_OWNER);
					goto pass;
				}
				next = h[0];
				h += 8;
			}
		}
		t.proto = next;
		l4 = h;
		if (t.proto == IPPROTO_ICMPV6) {
			__u8 *icmp = l4;
			if ((void *)(icmp + 8) > end)
				goto pass;
			// Destination unreachable, packet too big, time exceeded, parameter problem.
			if (icmp[0] < 1 || icmp[0] > 4)
				goto pass;
			if (!quoted_v6(&t, icmp + 8, end))
				goto pass;
			icmp_error = 1;
		}
	} else {
		goto pass;
	}

	if (!icmp_error) {
		if (!is_transport(t.proto) || !ports(&t, l4, end))
			goto pass;
	}
	__u32 who;
	__u32 why = owner(&t, &who);
	if (why) {
		if (icmp_error && why != STAT_SNAT_UNOWNED)
			count(STAT_ICMP_ERROR);
		return redirect(ctx, why, who);
	}
pass:
	count(STAT_PASS);
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
