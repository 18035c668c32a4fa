// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0-only)
//
// The XDP side of the bench tools (bench/src/pktgen/bpf.rs mirrors every layout below):
//
//   kxpg_sink      `pktgen rx`: counts every frame arriving on the interface (per-CPU
//                  counters), per destination address (a per-CPU array indexed by the
//                  address for IPv4 destinations in the window userspace configured,
//                  the expected destination network; a per-CPU hash for the rest), copies the first
//                  `sample_limit` frames to a ring buffer for checksum checks, and drops
//                  everything: a sink never forwards.
//   kxpg_redirect  `xdp_fwd`: every frame to the AF_XDP socket of its receive queue; a
//                  queue without a socket is counted and passed to the kernel.
//
// Self-contained (no system headers), like dataplane/bpf/steer.c; compiled by
// bench/build.rs with clang -target bpf -mcpu=v3 (the sample slot claim needs an atomic
// fetch-and-add).

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
				   __u64 flags) = (void *)2;
static long (*bpf_redirect_map)(void *map, __u64 key, __u64 flags) = (void *)51;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) = (void *)131;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)132;
static void (*bpf_ringbuf_discard)(void *data, __u64 flags) = (void *)133;
static __u64 (*bpf_xdp_get_buff_len)(void *ctx) = (void *)188;
static long (*bpf_xdp_load_bytes)(void *ctx, __u32 offset, void *buf, __u32 len) = (void *)189;

enum { XDP_ABORTED = 0, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT };
enum {
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_XSKMAP = 17,
	BPF_MAP_TYPE_RINGBUF = 27,
};
#define BPF_NOEXIST 1

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

// Counters, in the order of STAT_NAMES in bpf.rs.
enum stat {
	STAT_FRAMES,
	STAT_BYTES,
	STAT_IPV4,
	STAT_IPV6,
	STAT_TCP,
	STAT_UDP,
	STAT_NON_IP,	       // not IPv4/IPv6 (ARP, VLAN-tagged, ...)
	STAT_OTHER_L4,	       // IP but neither TCP nor UDP (ICMP, extension headers, ...)
	STAT_MALFORMED,	       // IP with truncated or invalid headers
	STAT_DST_TABLE_FULL,   // counted in frames, but not per destination
	STAT_SAMPLED,	       // frames copied to the sample ring
	STAT_SAMPLE_RING_FULL, // a sample was due but the ring had no room
	STAT_REDIRECTED,       // kxpg_redirect: handed to a socket
	STAT_NO_SOCKET,	       // kxpg_redirect: no socket on this queue, passed
	STAT_COUNT,
};

#define MAX_QUEUES 64
#define MAX_DSTS 65536
// IPv4 destinations counted by index (a /15): an array lookup costs the same at 10 and at
// 30,000 destinations, where the hash's probes missed in cache on the node's core and
// charged the harness's own bookkeeping to the system under test.
#define DST_WINDOW 131072
#define SAMPLE_MAX 2048

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

// A destination address as 16 bytes: IPv6 as is, IPv4 as ::ffff:a.b.c.d.
struct addr {
	__u32 w[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_DSTS);
	__type(key, struct addr);
	__type(value, __u64);
} dsts SEC(".maps");

struct config {
	__u32 sample_limit; // set by userspace before attaching
	__u32 sampled;	    // slots claimed so far
	__u32 win_base;	    // first IPv4 address of the destination window (host order)
	__u32 win_len;	    // addresses in the window (at most DST_WINDOW; 0: no window)
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DST_WINDOW);
	__type(key, __u32);
	__type(value, __u64);
} dst_window SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct sample {
	__u32 len;     // frame length
	__u32 cap_len; // bytes copied (at most SAMPLE_MAX)
	__u8 data[SAMPLE_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} samples SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

static __attribute__((always_inline)) inline void count(__u32 which, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);
	if (v)
		*v += n;
}

static __attribute__((always_inline)) inline void count_dst(struct addr *a)
{
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&config, &zero);
	if (c && a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0xffff0000) {
		__u32 be = a->w[3];
		__u32 host = (be >> 24) | ((be >> 8) & 0xff00) | ((be << 8) & 0xff0000) | (be << 24);
		__u32 i = host - c->win_base;
		if (i < c->win_len && i < DST_WINDOW) {
			__u64 *w = bpf_map_lookup_elem(&dst_window, &i);
			if (w) {
				*w += 1;
				return;
			}
		}
	}
	__u64 *v = bpf_map_lookup_elem(&dsts, a);
	if (v) {
		*v += 1;
		return;
	}
	__u64 one = 1;
	if (bpf_map_update_elem(&dsts, a, &one, BPF_NOEXIST) == 0)
		return;
	// Another CPU inserted it first, or the table is full.
	v = bpf_map_lookup_elem(&dsts, a);
	if (v)
		*v += 1;
	else
		count(STAT_DST_TABLE_FULL, 1);
}

static __attribute__((always_inline)) inline void take_sample(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct config *c = bpf_map_lookup_elem(&config, &zero);
	if (!c || c->sampled >= c->sample_limit)
		return;
	__u32 slot = __sync_fetch_and_add(&c->sampled, 1);
	if (slot >= c->sample_limit)
		return;
	struct sample *s = bpf_ringbuf_reserve(&samples, sizeof(*s), 0);
	if (!s) {
		count(STAT_SAMPLE_RING_FULL, 1);
		return;
	}
	__u32 len = bpf_xdp_get_buff_len(ctx);
	__u32 n = len;
	if (n > SAMPLE_MAX)
		n = SAMPLE_MAX;
	s->len = len;
	s->cap_len = n;
	if (n == 0 || bpf_xdp_load_bytes(ctx, 0, s->data, n) != 0) {
		bpf_ringbuf_discard(s, 0);
		return;
	}
	bpf_ringbuf_submit(s, 0);
	count(STAT_SAMPLED, 1);
}

SEC("xdp")
int kxpg_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u8 *p = data;
	count(STAT_FRAMES, 1);
	count(STAT_BYTES, (__u64)(end - data));
	take_sample(ctx);
	if (p + 14 > (__u8 *)end) {
		count(STAT_NON_IP, 1);
		return XDP_DROP;
	}
	__u16 ethertype = (__u16)p[12] << 8 | p[13];
	struct addr dst = {};
	__u8 l4proto;
	__u8 *l4;
	if (ethertype == 0x0800) {
		count(STAT_IPV4, 1);
		__u8 *ip = p + 14;
		if (ip + 20 > (__u8 *)end || (ip[0] >> 4) != 4 || (ip[0] & 0xf) < 5) {
			count(STAT_MALFORMED, 1);
			return XDP_DROP;
		}
		l4 = ip + (ip[0] & 0xf) * 4;
		l4proto = ip[9];
		dst.w[2] = 0xffff0000; // ::ffff:0:0 in network byte order, little-endian host
		dst.w[3] = *(__u32 *)(ip + 16);
	} else if (ethertype == 0x86dd) {
		count(STAT_IPV6, 1);
		__u8 *ip = p + 14;
		if (ip + 40 > (__u8 *)end || (ip[0] >> 4) != 6) {
			count(STAT_MALFORMED, 1);
			return XDP_DROP;
		}
		l4 = ip + 40;
		l4proto = ip[6];
		__u32 *d = (__u32 *)(ip + 24);
		dst.w[0] = d[0];
		dst.w[1] = d[1];
		dst.w[2] = d[2];
		dst.w[3] = d[3];
	} else {
		count(STAT_NON_IP, 1);
		return XDP_DROP;
	}
	if (l4proto == 6) {
		if (l4 + 20 > (__u8 *)end) {
			count(STAT_MALFORMED, 1);
			return XDP_DROP;
		}
		count(STAT_TCP, 1);
	} else if (l4proto == 17) {
		if (l4 + 8 > (__u8 *)end) {
			count(STAT_MALFORMED, 1);
			return XDP_DROP;
		}
		count(STAT_UDP, 1);
	} else {
		count(STAT_OTHER_L4, 1);
		return XDP_DROP;
	}
	count_dst(&dst);
	return XDP_DROP;
}

SEC("xdp")
int kxpg_redirect(struct xdp_md *ctx)
{
	__u32 q = ctx->rx_queue_index;
	if (bpf_map_lookup_elem(&xsks, &q)) {
		count(STAT_REDIRECTED, 1);
		return bpf_redirect_map(&xsks, q, XDP_PASS);
	}
	count(STAT_NO_SOCKET, 1);
	return XDP_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
