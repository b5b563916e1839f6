/* tracer.bpf.c: the kernel side of tracer-bpf.
 *
 * Two backends share one set of maps and one set of helpers below:
 *   - tracepoint: sock:inet_sock_set_state (perf tracepoint: its fields
 *     cross-check the guessed offsets), raw tracepoints sock_send_length,
 *     sock_recv_length, tcp_retransmit_skb, and syscalls:sys_{enter,exit}_*
 *     for the peer address of unconnected UDP;
 *   - kprobe: tcp_set_state, inet_csk_accept, tcp_sendmsg, tcp_sendpage,
 *     tcp_recvmsg, tcp_retransmit_skb, udp(v6)_sendmsg, udp(v6)_recvmsg.
 * Struct sock field offsets come from the offsets map, filled by
 * offsetguess.py before any data-path program is attached.
 *
 * Built with clang -target bpf and no kernel headers (see Makefile). */
#include "tracer.bpf.h"

#define SEC(name) __attribute__((section(name), used))
#define INLINE static inline __attribute__((always_inline))

/* BPF ABI numbers (include/uapi/linux/bpf.h). */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_ANY 0
#define BPF_NOEXIST 1

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;
static long (*bpf_get_current_comm)(void *buf, __u32 size) = (void *)16;
static long (*bpf_probe_read_user)(void *dst, __u32 size, const void *src) = (void *)112;
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;

/* Legacy map definition, read by elfload.py from the "maps" section. */
struct bpf_map_def {
	__u32 type;
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 map_flags;
};

#define MAP(name, t, k, v, n) \
	struct bpf_map_def SEC("maps") name = { .type = t, .key_size = k, .value_size = v, .max_entries = n }

MAP(conns, BPF_MAP_TYPE_HASH, sizeof(struct conn_tuple), sizeof(struct conn_stats), 65536);
MAP(socks, BPF_MAP_TYPE_HASH, sizeof(__u64), sizeof(struct sock_info), 65536);
MAP(stash, BPF_MAP_TYPE_HASH, sizeof(__u64), sizeof(struct stash), 16384);
/* Keys of conns entries changed since the poll generation began: the poll
 * drains it, so a poll costs what changed, not the table size. */
MAP(dirty, BPF_MAP_TYPE_HASH, sizeof(struct conn_tuple), sizeof(__u32), 65536);
MAP(offsets, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(struct offsets), 1);
MAP(telemetry, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u64), TELE_MAX);
MAP(tp_fields, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u32), TPF_MAX);
MAP(guess_req, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(struct guess_req), 1);
MAP(guess_dump, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(struct guess_dump), 1);
MAP(test_counts, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u64), 4);
MAP(test_bytes, BPF_MAP_TYPE_HASH, sizeof(__u32), sizeof(__u64), 1024);

char _license[] SEC("license") = "GPL";
__u32 _version SEC("version") = 0xFFFFFFFE; /* ignored by kernels >= 5.0 */

/* Kernel constants (stable ABI). */
#define AF_INET 2
#define AF_INET6 10
#define MSG_PEEK 2
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_LAST_ACK 9

/* x86-64 struct pt_regs. */
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};
#define PARM1(x) ((x)->di)
#define PARM2(x) ((x)->si)
#define PARM4(x) ((x)->cx)
#define PARM5(x) ((x)->r8)
#define RC(x) ((x)->ax)

/* struct bpf_raw_tracepoint_args */
struct raw_args {
	__u64 args[3];
};

/* ------------------------------------------------------------------ */
/* small helpers */

INLINE void tele_add(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&telemetry, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

INLINE struct offsets *ready_offsets(void)
{
	__u32 zero = 0;
	struct offsets *o = bpf_map_lookup_elem(&offsets, &zero);
	if (!o || !o->ready)
		return 0;
	return o;
}

INLINE void kread(void *dst, __u32 size, const void *src)
{
	if (bpf_probe_read_kernel(dst, size, src))
		tele_add(TELE_READ_FAULT);
}

/* Read a field of a perf tracepoint record at the offset user space found in
 * the format file.  The ctx pointer is laundered through the stack so the
 * verifier lets us add a run-time offset to it. */
INLINE void tp_read(void *ctx, __u32 field, void *dst, __u32 size)
{
	__u32 *off = bpf_map_lookup_elem(&tp_fields, &field);
	unsigned long base = 0;
	if (!off)
		return;
	bpf_probe_read_kernel(&base, sizeof(base), &ctx);
	bpf_probe_read_kernel(dst, size, (void *)(base + *off));
}

INLINE int differ16(const __u8 *a, const __u8 *b)
{
	__u64 x[2], y[2];
	__builtin_memcpy(x, a, 16);
	__builtin_memcpy(y, b, 16);
	return (x[0] ^ y[0]) | (x[1] ^ y[1]) ? 1 : 0;
}

INLINE __u16 swap16(__u16 v)
{
	return (v >> 8) | (v << 8);
}

INLINE int is_v4mapped_or_zero(const __u8 *a, int *mapped)
{
	__u32 w[4];
	__builtin_memcpy(w, a, 16);
	if (w[0] || w[1])
		return 0;
	if (w[2] == 0 && w[3] == 0)
		return 1;
	if (w[2] == 0xffff0000) { /* ::ffff:a.b.c.d in network order */
		*mapped = 1;
		return 1;
	}
	return 0;
}

/* IPv4-mapped IPv6 connections are reported as IPv4. */
INLINE void unmap_v4(struct conn_tuple *t)
{
	int mapped = 0;
	if (t->family != 6)
		return;
	if (!is_v4mapped_or_zero(t->saddr, &mapped) || !is_v4mapped_or_zero(t->daddr, &mapped) || !mapped)
		return;
	__builtin_memcpy(t->saddr, t->saddr + 12, 4);
	__builtin_memcpy(t->daddr, t->daddr + 12, 4);
	__builtin_memset(t->saddr + 4, 0, 12);
	__builtin_memset(t->daddr + 4, 0, 12);
	t->family = 4;
}

/* Fill t from a struct sock with the guessed offsets.  Returns 0 when the
 * socket is IPv4 or IPv6 (with v6 offsets known). */
INLINE int read_tuple(const void *sk, struct offsets *o, __u32 pid, __u8 proto, struct conn_tuple *t)
{
	__u16 family = 0, dport = 0;
	unsigned long net = 0;

	__builtin_memset(t, 0, sizeof(*t));
	t->pid = pid;
	t->proto = proto;
	kread(&family, sizeof(family), sk + o->family);
	if (family == AF_INET) {
		t->family = 4;
		kread(t->saddr, 4, sk + o->saddr);
		kread(t->daddr, 4, sk + o->daddr);
	} else if (family == AF_INET6 && o->ipv6) {
		t->family = 6;
		kread(t->saddr, 16, sk + o->v6_saddr);
		kread(t->daddr, 16, sk + o->v6_daddr);
	} else {
		return -1;
	}
	kread(&t->sport, sizeof(t->sport), sk + o->sport);
	kread(&dport, sizeof(dport), sk + o->dport);
	t->dport = swap16(dport);
	kread(&net, sizeof(net), sk + o->net);
	if (net)
		kread(&t->netns, sizeof(t->netns), (void *)(net + o->netns_inum));
	unmap_v4(t);
	return 0;
}

INLINE __u16 read_protocol(const void *sk, struct offsets *o)
{
	__u16 proto = 0;
	kread(&proto, sizeof(proto), sk + o->protocol);
	return proto;
}

/* Put t in the dirty set, once per poll generation. */
INLINE void mark_dirty(const struct conn_tuple *t, struct conn_stats *s, struct offsets *o)
{
	__u32 gen = o->gen;

	if (s->gen == gen)
		return;
	s->gen = gen;
	if (bpf_map_update_elem(&dirty, t, &gen, BPF_ANY))
		tele_add(TELE_DIRTY_LOST);
}

/* Find or create the conns entry of a tuple.  comm: the owner's name when
 * known (NULL: the current task's). */
INLINE struct conn_stats *get_stats(struct conn_tuple *t, __u8 dir, const char *comm,
				    struct offsets *o)
{
	struct conn_stats *s = bpf_map_lookup_elem(&conns, t);
	struct conn_stats fresh = {};
	long err;

	if (s)
		return s;
	fresh.first_ns = fresh.last_ns = bpf_ktime_get_ns();
	fresh.gen = o->gen;
	fresh.direction = dir;
	fresh.state = CONN_OPEN;
	if (comm)
		__builtin_memcpy(fresh.comm, comm, sizeof(fresh.comm));
	else
		bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
	err = bpf_map_update_elem(&conns, t, &fresh, BPF_NOEXIST);
	s = bpf_map_lookup_elem(&conns, t);
	if (!s && err)
		tele_add(TELE_CONN_LOST);
	if (s && !err && bpf_map_update_elem(&dirty, t, &fresh.gen, BPF_ANY))
		tele_add(TELE_DIRTY_LOST);
	return s;
}

INLINE void add_bytes(const struct conn_tuple *t, struct conn_stats *s, struct offsets *o,
		      __u64 sent, __u64 recv)
{
	if (sent)
		__sync_fetch_and_add(&s->sent_bytes, sent);
	if (recv)
		__sync_fetch_and_add(&s->recv_bytes, recv);
	s->last_ns = bpf_ktime_get_ns();
	s->state = CONN_OPEN;
	mark_dirty(t, s, o);
}

/* ------------------------------------------------------------------ */
/* TCP: socket ownership and state */

/* Process context: the current process takes an incoming socket that no
 * process owned yet, or adopts one opened before the tracer started. */
INLINE struct sock_info *claim_sock(const void *sk, struct offsets *o, __u8 dir_if_new)
{
	__u64 key = (__u64)sk;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);

	if (!si) {
		struct sock_info fresh = {};
		if (read_tuple(sk, o, 0, TRACER_PROTO_TCP, &fresh.tuple))
			return 0;
		fresh.has_tuple = 1;
		fresh.direction = dir_if_new;
		if (bpf_map_update_elem(&socks, &key, &fresh, BPF_NOEXIST) && !bpf_map_lookup_elem(&socks, &key))
			tele_add(TELE_SOCK_LOST);
		si = bpf_map_lookup_elem(&socks, &key);
		if (!si)
			return 0;
	}
	if (!si->has_tuple) {
		__u32 pid = si->tuple.pid;
		if (read_tuple(sk, o, pid, TRACER_PROTO_TCP, &si->tuple))
			return 0;
		si->has_tuple = 1;
	}
	if (si->tuple.pid == 0) {
		si->tuple.pid = tgid;
		bpf_get_current_comm(si->comm, sizeof(si->comm));
		get_stats(&si->tuple, si->direction, si->comm, o);
	}
	return si;
}

INLINE void tcp_count(const void *sk, struct offsets *o, __u64 sent, __u64 recv)
{
	struct sock_info *si = claim_sock(sk, o, DIR_UNKNOWN);
	struct conn_tuple t;
	struct conn_stats *s;

	if (!si)
		return;
	__builtin_memcpy(&t, &si->tuple, sizeof(t));
	t.pid = bpf_get_current_pid_tgid() >> 32;
	s = get_stats(&t, si->direction, 0, o);
	if (s)
		add_bytes(&t, s, o, sent, recv);
}

INLINE void tcp_state(const void *sk, struct offsets *o, int newstate)
{
	__u64 key = (__u64)sk;
	struct sock_info *si;

	if (newstate == TCP_SYN_SENT) { /* connect(), process context */
		struct sock_info fresh = {};
		fresh.tuple.pid = bpf_get_current_pid_tgid() >> 32;
		fresh.direction = DIR_OUTGOING;
		bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
		if (bpf_map_update_elem(&socks, &key, &fresh, BPF_ANY))
			tele_add(TELE_SOCK_LOST);
		return;
	}
	si = bpf_map_lookup_elem(&socks, &key);
	if (newstate == TCP_ESTABLISHED) {
		if (si && si->direction == DIR_OUTGOING && !si->has_tuple) {
			__u32 pid = si->tuple.pid;
			if (read_tuple(sk, o, pid, TRACER_PROTO_TCP, &si->tuple))
				return;
			si->has_tuple = 1;
			get_stats(&si->tuple, DIR_OUTGOING, si->comm, o);
		} else if (!si) { /* passive open: owner known at accept or first use */
			struct sock_info fresh = {};
			if (read_tuple(sk, o, 0, TRACER_PROTO_TCP, &fresh.tuple))
				return;
			fresh.has_tuple = 1;
			fresh.direction = DIR_INCOMING;
			if (bpf_map_update_elem(&socks, &key, &fresh, BPF_NOEXIST) && !bpf_map_lookup_elem(&socks, &key))
				tele_add(TELE_SOCK_LOST);
		}
		return;
	}
	if (newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK) { /* close() or shutdown() */
		if (si && si->tuple.pid == 0)
			claim_sock(sk, o, DIR_INCOMING);
		return;
	}
	if (newstate == TCP_CLOSE && si) {
		if (si->has_tuple && si->tuple.pid) {
			struct conn_stats *s = bpf_map_lookup_elem(&conns, &si->tuple);
			if (s) {
				s->state = CONN_CLOSED;
				s->last_ns = bpf_ktime_get_ns();
				mark_dirty(&si->tuple, s, o);
			}
		}
		bpf_map_delete_elem(&socks, &key);
	}
}

INLINE void tcp_retransmit(const void *sk)
{
	__u64 key = (__u64)sk;
	struct offsets *o = ready_offsets();
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);
	struct conn_stats *s;

	if (!o || !si || !si->has_tuple || !si->tuple.pid)
		return;
	s = bpf_map_lookup_elem(&conns, &si->tuple);
	if (s) {
		__sync_fetch_and_add(&s->retransmits, 1);
		mark_dirty(&si->tuple, s, o);
	}
}

/* ------------------------------------------------------------------ */
/* UDP */

INLINE void peer_from_sockaddr(struct peer *p, const void *sa, int user)
{
	__u8 buf[24] = {};
	__u16 family;

	if (user)
		bpf_probe_read_user(buf, sizeof(buf), sa);
	else
		bpf_probe_read_kernel(buf, sizeof(buf), sa);
	__builtin_memcpy(&family, buf, 2);
	__builtin_memset(p, 0, sizeof(*p));
	if (family == AF_INET) {
		p->family = 4;
		__builtin_memcpy(p->addr, buf + 4, 4);
	} else if (family == AF_INET6) {
		p->family = 6;
		__builtin_memcpy(p->addr, buf + 8, 16);
	} else {
		return;
	}
	__builtin_memcpy(&p->port, buf + 2, 2);
	p->port = swap16(p->port);
}

/* p: the message's peer (family 0: none).  Never NULL: clang turns a NULL
 * check of it into code that older verifiers (5.10, 6.1) reject. */
INLINE void udp_count(const void *sk, struct offsets *o, __u64 sent, __u64 recv, struct peer *p)
{
	struct conn_tuple t;
	struct conn_stats *s;

	if (read_tuple(sk, o, bpf_get_current_pid_tgid() >> 32, TRACER_PROTO_UDP, &t))
		return;
	if (p->family && t.dport == 0) { /* unconnected: the message's peer */
		if (p->family == 6 || t.family == 6) {
			if (t.family == 4) { /* cannot happen for a v4 socket */
				return;
			}
			__builtin_memcpy(t.daddr, p->addr, 16);
			if (p->family == 4) { /* only for v4 peers of v4-mapped v6 sockets */
				__builtin_memset(t.daddr, 0, 16);
				__builtin_memcpy(t.daddr + 12, p->addr, 4);
				t.daddr[10] = 0xff;
				t.daddr[11] = 0xff;
			}
			t.family = 6;
			unmap_v4(&t);
		} else {
			__builtin_memcpy(t.daddr, p->addr, 4);
		}
		t.dport = p->port;
	}
	s = get_stats(&t, sent ? DIR_OUTGOING : DIR_INCOMING, 0, o);
	if (s)
		add_bytes(&t, s, o, sent, recv);
}

/* ------------------------------------------------------------------ */
/* offset guessing: dump the raw struct sock seen in the guessing thread */

INLINE void guess_dump_sk(const void *sk)
{
	__u32 zero = 0;
	struct guess_req *g = bpf_map_lookup_elem(&guess_req, &zero);
	struct guess_dump *d;
	unsigned long net = 0;

	if (!g || g->pid_tgid != bpf_get_current_pid_tgid())
		return;
	d = bpf_map_lookup_elem(&guess_dump, &zero);
	if (!d)
		return;
	d->sk = (__u64)sk;
	d->sk_ok = 0;
	d->net_ok = 0;
#pragma unroll
	for (int i = 0; i < GUESS_SK_BYTES / GUESS_CHUNK; i++)
		if (!bpf_probe_read_kernel(d->sk_bytes + i * GUESS_CHUNK, GUESS_CHUNK, sk + i * GUESS_CHUNK))
			d->sk_ok |= 1 << i;
	if (g->net_off && g->net_off < GUESS_SK_BYTES) {
		bpf_probe_read_kernel(&net, sizeof(net), sk + g->net_off);
#pragma unroll
		for (int i = 0; i < GUESS_NET_BYTES / GUESS_CHUNK; i++)
			if (net && !bpf_probe_read_kernel(d->net_bytes + i * GUESS_CHUNK, GUESS_CHUNK, (void *)(net + i * GUESS_CHUNK)))
				d->net_ok |= 1 << i;
	}
	d->seq = g->seq;
}

SEC("raw_tracepoint/sock_send_length")
int guess_sock_send_length(struct raw_args *ctx)
{
	guess_dump_sk((void *)ctx->args[0]);
	return 0;
}

SEC("kprobe/udp_sendmsg")
int guess_udp_sendmsg(struct pt_regs *ctx)
{
	guess_dump_sk((void *)PARM1(ctx));
	return 0;
}

SEC("kprobe/tcp_sendmsg")
int guess_tcp_sendmsg(struct pt_regs *ctx)
{
	guess_dump_sk((void *)PARM1(ctx));
	return 0;
}

/* ------------------------------------------------------------------ */
/* tracepoint backend */

/* Process context: after sock_sendmsg()'s protocol handler returned ret. */
INLINE void on_send_length(const void *sk, long ret)
{
	struct offsets *o = ready_offsets();
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *st = 0;
	struct peer peer = {};
	__u16 proto;

	if (!o)
		return;
	proto = read_protocol(sk, o);
	if (proto == TRACER_PROTO_UDP) {
		st = bpf_map_lookup_elem(&stash, &id);
		if (st) /* a copy: no pointer into a maybe-NULL map value */
			__builtin_memcpy(&peer, &st->peer, sizeof(peer));
	}
	if (ret > 0) {
		if (proto == TRACER_PROTO_TCP)
			tcp_count(sk, o, ret, 0);
		else if (proto == TRACER_PROTO_UDP)
			udp_count(sk, o, ret, 0, &peer);
	}
	if (st)
		bpf_map_delete_elem(&stash, &id);
}

INLINE void on_recv_length(const void *sk, long ret, long flags)
{
	struct offsets *o = ready_offsets();
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *st;
	struct peer none = {};
	__u16 proto, dport = 0;

	if (!o || ret <= 0 || (flags & MSG_PEEK))
		return;
	proto = read_protocol(sk, o);
	if (proto == TRACER_PROTO_TCP) {
		tcp_count(sk, o, 0, ret);
		return;
	}
	if (proto != TRACER_PROTO_UDP)
		return;
	kread(&dport, sizeof(dport), sk + o->dport);
	st = dport ? 0 : bpf_map_lookup_elem(&stash, &id);
	if (st && st->uaddr) { /* the peer is copied to the user after this: wait for sys_exit */
		st->sk = (__u64)sk;
		st->bytes = ret;
		return;
	}
	udp_count(sk, o, 0, ret, &none);
}

SEC("raw_tracepoint/sock_send_length")
int tp_sock_send_length(struct raw_args *ctx)
{
	on_send_length((void *)ctx->args[0], (int)ctx->args[1]);
	return 0;
}

SEC("raw_tracepoint/sock_recv_length")
int tp_sock_recv_length(struct raw_args *ctx)
{
	on_recv_length((void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2]);
	return 0;
}

SEC("raw_tracepoint/tcp_retransmit_skb")
int tp_tcp_retransmit_skb(struct raw_args *ctx)
{
	tcp_retransmit((void *)ctx->args[0]);
	return 0;
}

/* Perf-tracepoint variants, for kernels without raw tracepoint support. */
SEC("tracepoint/sock/sock_send_length")
int tpp_sock_send_length(void *ctx)
{
	unsigned long sk = 0;
	int ret = 0;
	tp_read(ctx, TPF_SSL_SK, &sk, sizeof(sk));
	tp_read(ctx, TPF_SSL_RET, &ret, sizeof(ret));
	on_send_length((void *)sk, ret);
	return 0;
}

SEC("tracepoint/sock/sock_recv_length")
int tpp_sock_recv_length(void *ctx)
{
	unsigned long sk = 0;
	int ret = 0, flags = 0;
	tp_read(ctx, TPF_SSL_SK, &sk, sizeof(sk));
	tp_read(ctx, TPF_SSL_RET, &ret, sizeof(ret));
	tp_read(ctx, TPF_SSL_FLAGS, &flags, sizeof(flags));
	on_recv_length((void *)sk, ret, flags);
	return 0;
}

SEC("tracepoint/tcp/tcp_retransmit_skb")
int tpp_tcp_retransmit_skb(void *ctx)
{
	unsigned long sk = 0;
	tp_read(ctx, TPF_RETRANS_SKADDR, &sk, sizeof(sk));
	tcp_retransmit((void *)sk);
	return 0;
}

/* The tracepoint carries the tuple the kernel itself computed: compare it
 * with what the guessed offsets read. */
INLINE void cross_check(void *ctx, const void *sk, struct offsets *o)
{
	struct conn_tuple t;
	__u16 sport = 0, dport = 0, family = 0;
	__u8 saddr[16] = {}, daddr[16] = {};
	int bad;

	if (read_tuple(sk, o, 0, TRACER_PROTO_TCP, &t))
		return;
	tp_read(ctx, TPF_ISS_SPORT, &sport, sizeof(sport));
	tp_read(ctx, TPF_ISS_DPORT, &dport, sizeof(dport));
	tp_read(ctx, TPF_ISS_FAMILY, &family, sizeof(family));
	if (family == AF_INET) {
		tp_read(ctx, TPF_ISS_SADDR, saddr, 4);
		tp_read(ctx, TPF_ISS_DADDR, daddr, 4);
	} else {
		tp_read(ctx, TPF_ISS_SADDR_V6, saddr, 16);
		tp_read(ctx, TPF_ISS_DADDR_V6, daddr, 16);
	}
	bad = t.sport != sport || t.dport != dport;
	if (family == AF_INET || t.family == 6)
		bad |= differ16(t.saddr, saddr) | differ16(t.daddr, daddr);
	tele_add(TELE_TUPLE_CHECKED);
	if (bad)
		tele_add(TELE_TUPLE_MISMATCH);
}

SEC("tracepoint/sock/inet_sock_set_state")
int tp_inet_sock_set_state(void *ctx)
{
	struct offsets *o = ready_offsets();
	unsigned long sk = 0;
	int newstate = 0;
	__u16 protocol = 0;

	if (!o)
		return 0;
	tp_read(ctx, TPF_ISS_PROTOCOL, &protocol, sizeof(protocol));
	if (protocol != TRACER_PROTO_TCP)
		return 0;
	tp_read(ctx, TPF_ISS_SKADDR, &sk, sizeof(sk));
	tp_read(ctx, TPF_ISS_NEWSTATE, &newstate, sizeof(newstate));
	if (newstate == TCP_ESTABLISHED)
		cross_check(ctx, (void *)sk, o);
	tcp_state((void *)sk, o, newstate);
	return 0;
}

/* syscalls: the peer address of unconnected UDP. */
INLINE void stash_put(struct stash *st)
{
	__u64 id = bpf_get_current_pid_tgid();
	if (bpf_map_update_elem(&stash, &id, st, BPF_ANY))
		tele_add(TELE_STASH_LOST);
}

SEC("tracepoint/syscalls/sys_enter_sendto")
int tp_sys_enter_sendto(void *ctx)
{
	unsigned long addr = 0;
	struct stash st = {};

	tp_read(ctx, TPF_SENDTO_ADDR, &addr, sizeof(addr));
	if (!addr)
		return 0;
	peer_from_sockaddr(&st.peer, (void *)addr, 1);
	st.has_peer = 1;
	stash_put(&st);
	return 0;
}

/* user struct msghdr: msg_name at offset 0 (x86-64 ABI). */
INLINE unsigned long user_msg_name(void *ctx, __u32 field)
{
	unsigned long msg = 0, name = 0;
	tp_read(ctx, field, &msg, sizeof(msg));
	if (msg)
		bpf_probe_read_user(&name, sizeof(name), (void *)msg);
	return name;
}

SEC("tracepoint/syscalls/sys_enter_sendmsg")
int tp_sys_enter_sendmsg(void *ctx)
{
	unsigned long name = user_msg_name(ctx, TPF_SENDMSG_MSG);
	struct stash st = {};

	if (!name)
		return 0;
	peer_from_sockaddr(&st.peer, (void *)name, 1);
	st.has_peer = 1;
	stash_put(&st);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_recvfrom")
int tp_sys_enter_recvfrom(void *ctx)
{
	unsigned long addr = 0;
	struct stash st = {};

	tp_read(ctx, TPF_RECVFROM_ADDR, &addr, sizeof(addr));
	if (!addr)
		return 0;
	st.uaddr = addr;
	stash_put(&st);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_recvmsg")
int tp_sys_enter_recvmsg(void *ctx)
{
	struct stash st = {};

	st.uaddr = user_msg_name(ctx, TPF_RECVMSG_MSG);
	if (!st.uaddr)
		return 0;
	stash_put(&st);
	return 0;
}

INLINE void finish_recv(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *st = bpf_map_lookup_elem(&stash, &id);
	struct offsets *o;
	struct peer p;

	if (!st)
		return;
	o = ready_offsets();
	if (st->sk && o) {
		peer_from_sockaddr(&p, (void *)st->uaddr, 1);
		if (!p.family)
			tele_add(TELE_PENDING_LOST);
		udp_count((void *)st->sk, o, 0, st->bytes, &p);
	}
	bpf_map_delete_elem(&stash, &id);
}

SEC("tracepoint/syscalls/sys_exit_recvfrom")
int tp_sys_exit_recvfrom(void *ctx)
{
	finish_recv();
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_recvmsg")
int tp_sys_exit_recvmsg(void *ctx)
{
	finish_recv();
	return 0;
}

/* ------------------------------------------------------------------ */
/* kprobe backend */

INLINE void stash_args(const void *sk, const void *msg, long flags)
{
	struct stash st = {};
	st.sk = (__u64)sk;
	st.msg = (__u64)msg;
	st.flags = flags;
	stash_put(&st);
}

INLINE struct stash *stash_take(struct stash *copy)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *st = bpf_map_lookup_elem(&stash, &id);
	if (!st)
		return 0;
	__builtin_memcpy(copy, st, sizeof(*copy));
	bpf_map_delete_elem(&stash, &id);
	return copy;
}

SEC("kprobe/tcp_set_state")
int kp_tcp_set_state(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	if (o)
		tcp_state((void *)PARM1(ctx), o, (int)PARM2(ctx));
	return 0;
}

SEC("kretprobe/inet_csk_accept")
int krp_inet_csk_accept(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	void *sk = (void *)RC(ctx);
	if (o && sk)
		claim_sock(sk, o, DIR_INCOMING);
	return 0;
}

SEC("kprobe/tcp_sendmsg")
int kp_tcp_sendmsg(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), 0, 0);
	return 0;
}

/* tcp_sendpage(sk, page, offset, size, flags): sendfile before 6.5 */
SEC("kprobe/tcp_sendpage")
int kp_tcp_sendpage(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), 0, 0);
	return 0;
}

INLINE void tcp_send_return(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	struct stash copy, *st = stash_take(&copy);
	long ret = (int)RC(ctx); /* these functions return int: -EAGAIN is not 4294967285 */
	if (o && st && ret > 0)
		tcp_count((void *)st->sk, o, ret, 0);
}

SEC("kretprobe/tcp_sendmsg")
int krp_tcp_sendmsg(struct pt_regs *ctx)
{
	tcp_send_return(ctx);
	return 0;
}

SEC("kretprobe/tcp_sendpage")
int krp_tcp_sendpage(struct pt_regs *ctx)
{
	tcp_send_return(ctx);
	return 0;
}

/* tcp_recvmsg(sk, msg, len, flags, addr_len) from 5.19;
 * tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len) before. */
SEC("kprobe/tcp_recvmsg")
int kp_tcp_recvmsg(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), 0, PARM4(ctx));
	return 0;
}

SEC("kprobe/tcp_recvmsg")
int kp_tcp_recvmsg_pre_5_19(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), 0, PARM5(ctx));
	return 0;
}

SEC("kretprobe/tcp_recvmsg")
int krp_tcp_recvmsg(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	struct stash copy, *st = stash_take(&copy);
	long ret = (int)RC(ctx); /* these functions return int: -EAGAIN is not 4294967285 */
	if (o && st && ret > 0 && !(st->flags & MSG_PEEK))
		tcp_count((void *)st->sk, o, 0, ret);
	return 0;
}

SEC("kprobe/tcp_retransmit_skb")
int kp_tcp_retransmit_skb(struct pt_regs *ctx)
{
	tcp_retransmit((void *)PARM1(ctx));
	return 0;
}

/* udp_sendmsg(sk, msg, len); kernel struct msghdr: msg_name at offset 0. */
INLINE void udp_send_entry(struct pt_regs *ctx)
{
	struct stash st = {};
	unsigned long name = 0;

	st.sk = PARM1(ctx);
	bpf_probe_read_kernel(&name, sizeof(name), (void *)PARM2(ctx));
	if (name) {
		peer_from_sockaddr(&st.peer, (void *)name, 0);
		st.has_peer = 1;
	}
	stash_put(&st);
}

INLINE void udp_send_return(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	struct stash copy, *st = stash_take(&copy);
	long ret = (int)RC(ctx); /* these functions return int: -EAGAIN is not 4294967285 */
	if (o && st && ret > 0)
		udp_count((void *)st->sk, o, ret, 0, &st->peer);
}

SEC("kprobe/udp_sendmsg")
int kp_udp_sendmsg(struct pt_regs *ctx)
{
	udp_send_entry(ctx);
	return 0;
}

SEC("kretprobe/udp_sendmsg")
int krp_udp_sendmsg(struct pt_regs *ctx)
{
	udp_send_return(ctx);
	return 0;
}

SEC("kprobe/udpv6_sendmsg")
int kp_udpv6_sendmsg(struct pt_regs *ctx)
{
	udp_send_entry(ctx);
	return 0;
}

SEC("kretprobe/udpv6_sendmsg")
int krp_udpv6_sendmsg(struct pt_regs *ctx)
{
	udp_send_return(ctx);
	return 0;
}

/* udp(v6)_recvmsg: same argument change as tcp_recvmsg in 5.19. */
SEC("kprobe/udp_recvmsg")
int kp_udp_recvmsg(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), (void *)PARM2(ctx), PARM4(ctx));
	return 0;
}

SEC("kprobe/udp_recvmsg")
int kp_udp_recvmsg_pre_5_19(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), (void *)PARM2(ctx), PARM5(ctx));
	return 0;
}

INLINE void udp_recv_return(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	struct stash copy, *st = stash_take(&copy);
	long ret = (int)RC(ctx); /* these functions return int: -EAGAIN is not 4294967285 */
	unsigned long name = 0;
	struct peer p = {};

	if (!o || !st || ret <= 0 || (st->flags & MSG_PEEK))
		return;
	bpf_probe_read_kernel(&name, sizeof(name), (void *)st->msg);
	if (name)
		peer_from_sockaddr(&p, (void *)name, 0);
	udp_count((void *)st->sk, o, 0, ret, &p);
}

SEC("kretprobe/udp_recvmsg")
int krp_udp_recvmsg(struct pt_regs *ctx)
{
	udp_recv_return(ctx);
	return 0;
}

SEC("kprobe/udpv6_recvmsg")
int kp_udpv6_recvmsg(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), (void *)PARM2(ctx), PARM4(ctx));
	return 0;
}

SEC("kprobe/udpv6_recvmsg")
int kp_udpv6_recvmsg_pre_5_19(struct pt_regs *ctx)
{
	stash_args((void *)PARM1(ctx), (void *)PARM2(ctx), PARM5(ctx));
	return 0;
}

SEC("kretprobe/udpv6_recvmsg")
int krp_udpv6_recvmsg(struct pt_regs *ctx)
{
	udp_recv_return(ctx);
	return 0;
}

/* ------------------------------------------------------------------ */
/* self-test programs (test/): no offsets needed */

SEC("raw_tracepoint/sock_send_length")
int test_send_bytes(struct raw_args *ctx)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	long ret = (int)ctx->args[1];
	__u64 *v, init = 0;

	if (ret <= 0)
		return 0;
	v = bpf_map_lookup_elem(&test_bytes, &tgid);
	if (!v) {
		bpf_map_update_elem(&test_bytes, &tgid, &init, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&test_bytes, &tgid);
		if (!v)
			return 0;
	}
	__sync_fetch_and_add(v, ret);
	return 0;
}

SEC("tracepoint/sock/sock_send_length")
int test_send_calls_tp(void *ctx)
{
	__u32 idx = TEST_SEND_CALLS;
	__u64 *v = bpf_map_lookup_elem(&test_counts, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
	return 0;
}

INLINE void test_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&test_counts, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("kprobe/tcp_v4_connect")
int test_tcp_v4_connect(struct pt_regs *ctx)
{
	test_count(TEST_CONNECT_ENTRY);
	return 0;
}

SEC("kretprobe/tcp_v4_connect")
int test_tcp_v4_connect_ret(struct pt_regs *ctx)
{
	test_count(TEST_CONNECT_RETURN);
	return 0;
}
