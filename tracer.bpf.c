/* tracer.bpf.c: the kernel side of tracer-bpf.
 *
 * Two backends share one set of maps and one set of helpers below: one
 * program per hook, its SEC() naming the kind and the target.  Which
 * programs each backend attaches (and when, on which kernels) is said once,
 * in backends.py's REGISTRY; a name's prefix says its kind (kp_ kprobe,
 * krp_ kretprobe, tp_ raw or perf tracepoint, tpp_ perf tracepoint, cg_
 * cgroup, guess_ offset guessing), which abi.check_object holds it to.
 * Struct sock field offsets come from the offsets map, filled by
 * offsetguess.py before any data-path program is attached.
 *
 * Built with clang -target bpf and no kernel headers (see Makefile). */
#include "tracer.bpf.h"

#define INLINE static inline __attribute__((always_inline))

/* BPF ABI numbers (include/uapi/linux/bpf.h). */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_LRU_HASH 9
#define BPF_MAP_TYPE_RINGBUF 27
#define BPF_ANY 0
#define BPF_NOEXIST 1

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static long (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;
static __u64 (*bpf_get_current_task)(void) = (void *)35;
static long (*bpf_get_current_comm)(void *buf, __u32 size) = (void *)16;
static long (*bpf_probe_read_user)(void *dst, __u32 size, const void *src) = (void *)112;
static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;
static long (*bpf_ringbuf_output)(void *ringbuf, void *data, __u64 size, __u64 flags) = (void *)130;

MAP(conns, BPF_MAP_TYPE_HASH, sizeof(struct conn_tuple), sizeof(struct conn_stats), 65536);
MAP(socks, BPF_MAP_TYPE_HASH, sizeof(__u64), sizeof(struct sock_info), 65536);
/* per-thread state of one syscall, taken by its later hook.  An LRU whose
 * entries are written and cleared in place (stash_put, stash_clear): after
 * a thread's first call, a call costs two lookups, no map update or
 * delete; the entries of threads that ended are evicted when it is full
 * (one that a call is using is recently used, so not evicted first).  An
 * entry a syscall left behind (a kretprobe missed) is overwritten by the
 * thread's next call. */
MAP(stash, BPF_MAP_TYPE_LRU_HASH, sizeof(__u64), sizeof(struct stash), 16384);
/* Records changed since the poll generation began, with where they live
 * (value: the struct sock address of a socks entry, 0 for conns): the
 * poll drains it, so a poll costs what changed, not the table size. */
MAP(dirty, BPF_MAP_TYPE_HASH, sizeof(struct conn_tuple), sizeof(__u64), 65536);
/* TCP sockets not to track: their life found the socks map full
 * (SKIP_LOST: never adopted later with partial counts, their bytes are
 * counted lost) or the filters exclude them (SKIP_FILTERED: their events
 * end after this lookup).  Until the kernel destroys the socket. */
MAP(skip_socks, BPF_MAP_TYPE_LRU_HASH, sizeof(__u64), sizeof(__u32), 16384);
#define SKIP_LOST 1
#define SKIP_FILTERED 2
/* unconnected UDP sockets: the source of the datagram at the head of the
 * receive queue, the next one a plain recv() or read() will return */
MAP(udp_next, BPF_MAP_TYPE_LRU_HASH, sizeof(__u64), sizeof(struct peer), 16384);
/* unconnected UDP sockets: the peer of the last addressed send that
 * succeeded, where the thread that made it went on to send from another
 * socket (remember_sent_to) */
MAP(udp_sent, BPF_MAP_TYPE_LRU_HASH, sizeof(__u64), sizeof(struct peer), 4096);
/* SYN-ACK retransmits by tuple, until the connection is established */
MAP(synack_retrans, BPF_MAP_TYPE_LRU_HASH, sizeof(struct conn_tuple), sizeof(__u32), 4096);
/* per-CPU scratch: a copy of the start of a struct sock (read_tuple_block;
 * 16 bytes of slack so a 16-byte field at any masked offset stays inside),
 * of an sk_buff's fields (udp_sent_skb) or of the bytes before a received
 * IPv6 datagram's UDP header (peer_from_ipv6_ext) */
MAP(skc_copy, BPF_MAP_TYPE_PERCPU_ARRAY, sizeof(__u32), SCRATCH_BYTES, 1);
/* index 0: the last connection life number handed out */
MAP(life_seq, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u64), 1);
MAP(offsets, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(struct offsets), 1);
MAP(telemetry, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u64), TELE_MAX);
MAP(tp_fields, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u32), TPF_MAX);
MAP(guess_req, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(struct guess_req), 1);
MAP(guess_dump, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(struct guess_dump), 1);
/* connection events (only with WANT_EVENTS); the loader sizes it: a page
 * when events are off */
MAP(events, BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 20);

char _license[] SEC("license") = "GPL";
__u32 _version SEC("version") = 0xFFFFFFFE; /* ignored by kernels >= 5.0 */

/* Kernel constants (stable ABI). */
#define AF_INET 2
#define AF_INET6 10
#define MSG_PEEK 2
#define MSG_ERRQUEUE 0x2000
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_CLOSING 11
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define EPIPE 32
#define ECONNRESET 104
#define ETIMEDOUT 110
#define ECONNREFUSED 111

/* x86-64 struct pt_regs. */
struct pt_regs {
	unsigned long r15, r14, r13, r12, bp, bx, r11, r10, r9, r8;
	unsigned long ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};
#define PARM1(x) ((x)->di)
#define PARM2(x) ((x)->si)
#define PARM3(x) ((x)->dx)
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

INLINE void tele_addn(__u32 idx, __u64 n)
{
	__u64 *v;

	/* (an add of a constant 0 would compile to an atomic OR, which
	 * kernels before 5.12 refuse: "BPF_STX uses reserved fields") */
	if (!n)
		return;
	v = bpf_map_lookup_elem(&telemetry, &idx);
	if (v)
		__sync_fetch_and_add(v, n);
}

INLINE void kread(void *dst, __u32 size, const void *src)
{
	if (bpf_probe_read_kernel(dst, size, src))
		tele_add(TELE_READ_FAULTS);
}

/* The process's name: its main thread's comm, when the task_struct offsets
 * were found; else the current thread's. */
INLINE void process_comm(char *buf, struct offsets *o)
{
	unsigned long task, leader = 0;

	if (o->task_comm && o->task_leader) {
		task = bpf_get_current_task();
		if (!bpf_probe_read_kernel(&leader, sizeof(leader), (void *)(task + o->task_leader)) && leader &&
		    !bpf_probe_read_kernel(buf, 16, (void *)(leader + o->task_comm)))
			return;
	}
	bpf_get_current_comm(buf, 16);
}

/* Whether comm is GUESS_COMM: a tracer guessing offsets names its process
 * so while it makes its probe connections, and every other tracer leaves
 * them out (tracer.bpf.h). */
INLINE int guess_comm(const char *comm)
{
	__u64 a, b;

	__builtin_memcpy(&a, comm, 8);
	__builtin_memcpy(&b, comm + 8, 8);
	return a == GUESS_COMM_LO && b == GUESS_COMM_HI;
}

/* Whether the current process is a tracer guessing its offsets. */
INLINE int by_guesser(struct offsets *o)
{
	char comm[16];

	process_comm(comm, o);
	return guess_comm(comm);
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
/* The tuple from one probe read of the start of struct sock (where the
 * guessed fields all lie there, as on every x86-64 kernel seen): the
 * fields are then loads from a per-CPU copy, not seven helper calls. */
INLINE int read_tuple_block(const void *sk, struct offsets *o, struct conn_tuple *t, unsigned long *netp)
{
	__u32 zero = 0;
	__u8 *b = bpf_map_lookup_elem(&skc_copy, &zero);
	__u16 family, dport;
	unsigned long net;

	if (!b || bpf_probe_read_kernel(b, SKC_BLOCK, sk)) {
		tele_add(TELE_READ_FAULTS);
		return -1;
	}
	__builtin_memcpy(&family, b + (o->family & (SKC_BLOCK - 1)), 2);
	if (family == AF_INET) {
		t->family = 4;
		__builtin_memcpy(t->saddr, b + (o->saddr & (SKC_BLOCK - 1)), 4);
		__builtin_memcpy(t->daddr, b + (o->daddr & (SKC_BLOCK - 1)), 4);
	} else if (family == AF_INET6 && o->ipv6) {
		t->family = 6;
		__builtin_memcpy(t->saddr, b + (o->v6_saddr & (SKC_BLOCK - 1)), 16);
		__builtin_memcpy(t->daddr, b + (o->v6_daddr & (SKC_BLOCK - 1)), 16);
	} else {
		return -1;
	}
	__builtin_memcpy(&t->sport, b + (o->sport & (SKC_BLOCK - 1)), 2);
	__builtin_memcpy(&dport, b + (o->dport & (SKC_BLOCK - 1)), 2);
	t->dport = swap16(dport);
	__builtin_memcpy(&net, b + (o->net & (SKC_BLOCK - 1)), 8);
	if (netp)
		*netp = net;
	else if (net)
		kread(&t->netns, sizeof(t->netns), (void *)(net + o->netns_inum));
	unmap_v4(t);
	return 0;
}

/* netp: where to leave the struct net pointer instead of reading the
 * namespace's inode number into t->netns (the caller reads it with
 * read_netns when it needs it) */
INLINE int read_tuple_net(const void *sk, struct offsets *o, __u32 pid, __u8 proto, struct conn_tuple *t,
			  unsigned long *netp)
{
	__u16 family = 0, dport = 0;
	unsigned long net = 0;

	__builtin_memset(t, 0, sizeof(*t));
	t->pid = pid;
	t->proto = proto;
	if (o->skc_block)
		return read_tuple_block(sk, o, t, netp);
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
	if (netp)
		*netp = net;
	else if (net)
		kread(&t->netns, sizeof(t->netns), (void *)(net + o->netns_inum));
	unmap_v4(t);
	return 0;
}

INLINE int read_tuple(const void *sk, struct offsets *o, __u32 pid, __u8 proto, struct conn_tuple *t)
{
	return read_tuple_net(sk, o, pid, proto, t, 0);
}

INLINE void read_netns(struct conn_tuple *t, unsigned long net, struct offsets *o)
{
	if (net)
		kread(&t->netns, sizeof(t->netns), (void *)(net + o->netns_inum));
}

INLINE __u16 read_protocol(const void *sk, struct offsets *o)
{
	__u16 proto = 0;
	kread(&proto, sizeof(proto), sk + o->protocol);
	return proto;
}

/* The filters given to the tracer: 0 when t is not to be stored.  A pid
 * of 0 (owner not known yet), or no tuple yet (family 0: connect() before
 * its port is chosen), passes for now. */
INLINE int wanted(struct offsets *o, const struct conn_tuple *t)
{
	__u32 want = o->want;

	if (want) {
		if (!(want & (t->proto == TRACER_PROTO_TCP ? WANT_TCP : WANT_UDP)))
			return 0;
		if (t->family && !(want & (t->family == 4 ? WANT_V4 : WANT_V6)))
			return 0;
	}
	if (o->pid_filter && t->pid && t->pid != o->pid_filter)
		return 0;
	if (o->port_filter && t->family && t->sport != o->port_filter && t->dport != o->port_filter)
		return 0; /* (a connect's ports are checked once known) */
	return 1;
}

/* Put t in the dirty set, once per poll generation.  where: the struct
 * sock address when the record lives in socks, 0 when in conns. */
INLINE void mark_dirty(const struct conn_tuple *t, struct conn_stats *s, struct offsets *o, __u64 where)
{
	__u32 gen = o->gen;

	if (s->gen == gen)
		return;
	s->gen = gen;
	if (bpf_map_update_elem(&dirty, t, &where, BPF_ANY))
		tele_add(TELE_DIRTY_LOST);
}

/* with_comm: the current process is the record's (else it is named when
 * a process claims it) */
INLINE void init_stats(struct conn_stats *s, __u8 dir, int with_comm, struct offsets *o)
{
	s->first_ns = s->last_ns = bpf_ktime_get_ns();
	s->gen = o->gen - 1; /* not yet marked in this generation */
	s->direction = dir;
	s->state = CONN_OPEN;
	if (with_comm)
		process_comm(s->comm, o);
}

/* The kernel's smoothed RTT of a TCP socket and its variance, as TCP_INFO
 * gives them (tcpi_rtt, tcpi_rttvar), into s; nothing where the offsets
 * could not be guessed.  Read at events that fire anyway. */
INLINE void read_rtt(const void *sk, struct offsets *o, struct conn_stats *s)
{
	__u32 v = 0;

	if (!o->srtt)
		return;
	if (!bpf_probe_read_kernel(&v, sizeof(v), sk + o->srtt) && v)
		s->rtt_us = v >> 3;
	if (o->mdev && !bpf_probe_read_kernel(&v, sizeof(v), sk + o->mdev))
		s->rtt_var_us = v >> 2;
}

/* Push one event, if events are wanted; a full ring buffer is counted. */
INLINE void emit(struct offsets *o, __u8 type, const struct conn_tuple *t, const struct conn_stats *s)
{
	struct conn_event e;

	if (!(o->want & WANT_EVENTS))
		return;
	__builtin_memset(&e, 0, sizeof(e));
	e.ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(&e.tuple, t, sizeof(e.tuple));
	e.type = type;
	e.end = s->end;
	e.direction = s->direction;
	e.seen_start = s->seen_start;
	e.sent_bytes = s->sent_bytes;
	e.recv_bytes = s->recv_bytes;
	e.first_ns = s->first_ns;
	e.retransmits = s->retransmits;
	e.rtt_us = s->rtt_us;
	e.rtt_var_us = s->rtt_var_us;
	__builtin_memcpy(e.comm, s->comm, sizeof(e.comm));
	if (bpf_ringbuf_output(&events, &e, sizeof(e), 0))
		tele_add(TELE_EVENTS_LOST);
	else
		tele_add(TELE_EVENTS);
}

/* Find or create the conns entry of a tuple, named after the current
 * process.  lost: the telemetry slot to count a full map in. */
INLINE struct conn_stats *get_stats(struct conn_tuple *t, __u8 dir, struct offsets *o, __u32 lost)
{
	struct conn_stats *s = bpf_map_lookup_elem(&conns, t);
	struct conn_stats fresh = {};
	long err;

	if (s)
		return s;
	init_stats(&fresh, dir, 1, o);
	err = bpf_map_update_elem(&conns, t, &fresh, BPF_NOEXIST);
	s = bpf_map_lookup_elem(&conns, t);
	if (!s && err)
		tele_add(lost);
	else if (s && !err && t->proto == TRACER_PROTO_UDP)
		emit(o, EV_UDP_OPEN, t, s);
	return s;
}

INLINE void add_bytes(const struct conn_tuple *t, struct conn_stats *s, struct offsets *o,
		      __u64 sent, __u64 recv, __u64 where)
{
	if (sent)
		__sync_fetch_and_add(&s->sent_bytes, sent);
	if (recv)
		__sync_fetch_and_add(&s->recv_bytes, recv);
	/* no clock read here: user space tells idle entries by their counters */
	mark_dirty(t, s, o, where);
}

/* ------------------------------------------------------------------ */
/* TCP: one socks entry per socket life, from connect or passive open (or
 * first use, for a socket opened before the tracer) until the kernel
 * destroys the socket.  Its tuple is read once, while valid: after
 * TCP_CLOSE the kernel has released the local port, yet a half-closed or
 * reset socket can still be read. */

/* Life numbers only need to differ between lives of one 4-tuple, which
 * never start at the same time: a plain increment will do (5.10 has no
 * atomic fetch-and-add). */
INLINE __u32 next_life(void)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&life_seq, &zero);
	__u64 n;

	if (!v)
		return 0;
	n = *v + 1;
	*v = n;
	return (__u32)n;
}

/* How a TCP connection ended, at its TCP_CLOSE: from the state it left and
 * the error the kernel has just set (sk_err: ECONNREFUSED for a reset to
 * our SYN, ECONNRESET or EPIPE for a reset received, ETIMEDOUT after
 * retransmits, EHOSTUNREACH and the like from ICMP).  Without an error, an
 * established connection that closes without passing a FIN state was
 * aborted by its owner with a reset (unread data, SO_LINGER 0). */
INLINE __u8 end_of(const void *sk, struct offsets *o, int oldstate)
{
	int err = 0;

	if (o->sk_err)
		kread(&err, sizeof(err), sk + o->sk_err);
	if (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV) {
		if (err == ECONNREFUSED || err == ECONNRESET)
			return END_REFUSED;
		if (err == ETIMEDOUT)
			return END_CONNECT_TIMEOUT;
		return err ? END_UNREACHABLE : END_ABORTED;
	}
	if (err == ECONNRESET || err == EPIPE || err == ECONNREFUSED)
		return END_RESET_RECEIVED;
	if (err)
		return END_TIMEOUT;
	if (oldstate == TCP_ESTABLISHED || oldstate == TCP_CLOSE_WAIT)
		return o->sk_err ? END_RESET_SENT : END_NONE; /* unknown without sk_err */
	return END_FIN;
}

/* Mark the records of the other processes that used the socket closed. */
INLINE void close_others(struct sock_info *si, struct offsets *o)
{
	struct conn_tuple t;
	struct conn_stats *s;

	__builtin_memcpy(&t, &si->tuple, sizeof(t));
#pragma unroll
	for (int i = 0; i < SOCK_OTHERS; i++) {
		if (!si->others[i])
			continue;
		t.pid = si->others[i];
		s = bpf_map_lookup_elem(&conns, &t);
		if (s && s->state != CONN_CLOSED) {
			s->state = CONN_CLOSED;
			s->last_ns = bpf_ktime_get_ns();
			mark_dirty(&t, s, o, 0);
		}
	}
}

INLINE void close_life(struct sock_info *si, struct offsets *o, __u64 key)
{
	if (si->stats.state == CONN_CLOSED)
		return;
	si->stats.state = CONN_CLOSED;
	si->stats.last_ns = bpf_ktime_get_ns();
	close_others(si, o);
	if (si->has_tuple && si->tuple.pid)
		mark_dirty(&si->tuple, &si->stats, o, key);
}

/* The socket's life is over (destroyed, or its memory holds a new one): its
 * owner's record moves from socks to conns, where the poll finds it. */
INLINE void end_life(__u64 key, struct sock_info *si, struct offsets *o)
{
	if (si->tuple.proto == TRACER_PROTO_TCP)
		close_life(si, o, key);
	/* (a UDP socket's flow has no close: it moves to conns open, and expires) */
	if (si->has_tuple && si->tuple.pid) {
		si->stats.gen = o->gen;
		if (bpf_map_update_elem(&conns, &si->tuple, &si->stats, BPF_ANY))
			tele_add(TELE_CLOSED_LOST);
		else if (bpf_map_update_elem(&dirty, &si->tuple, &(__u64){0}, BPF_ANY))
			tele_add(TELE_DIRTY_LOST);
	}
	bpf_map_delete_elem(&socks, &key);
}

INLINE int same_tuple(const struct conn_tuple *a, const struct conn_tuple *b)
{
	return !differ16(a->saddr, b->saddr) && !differ16(a->daddr, b->daddr) &&
	       a->sport == b->sport && a->dport == b->dport && a->family == b->family &&
	       a->netns == b->netns;
}

/* kprobe backend: a TCP socket's bytes are the moves of its sequence
 * counters, tcp_sock's write_seq (bytes the application queued) and
 * copied_seq (bytes it read), since they were last counted; their
 * baseline is taken where the life starts (ESTABLISHED: the SYN is
 * behind both, and nothing was read or queued yet).  Not guessed for the
 * tracepoint backend (write_seq 0): nothing is read. */
INLINE void seq_baseline(const void *sk, struct offsets *o, struct sock_info *si)
{
	if (!o->write_seq)
		return;
	kread(&si->write_seq, sizeof(si->write_seq), sk + o->write_seq);
	kread(&si->copied_seq, sizeof(si->copied_seq), sk + o->copied_seq);
	si->seq_flags = SEQ_SEND | SEQ_RECV;
}

/* Start a new life on sk: whatever entry was there ends first (unless it
 * is this very life, open with the same tuple).  pid 0: owner not known
 * yet (passive open: the first process to use it). */
INLINE struct sock_info *new_life(const void *sk, struct offsets *o, __u32 pid, __u8 dir,
				  int read_now, int seen_start)
{
	__u64 key = (__u64)sk;
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);
	struct sock_info fresh = {};

	if (read_now) {
		if (read_tuple(sk, o, pid, TRACER_PROTO_TCP, &fresh.tuple)) {
			if (si)
				end_life(key, si, o);
			return 0;
		}
		fresh.has_tuple = 1;
		seq_baseline(sk, o, &fresh);
		/* the same open life, made meanwhile on another CPU: accept()
		 * can return the socket (claim_sock) before the handshake's
		 * last step set it ESTABLISHED (tcp_state), in either order */
		if (si && si->tuple.proto == TRACER_PROTO_TCP && si->has_tuple &&
		    si->stats.state == CONN_OPEN && same_tuple(&si->tuple, &fresh.tuple)) {
			if (seen_start)
				si->stats.seen_start = 1;
			return si;
		}
	}
	if (si)
		end_life(key, si, o);
	if (!read_now) {
		fresh.tuple.pid = pid;
		fresh.tuple.proto = TRACER_PROTO_TCP;
	}
	if (!wanted(o, &fresh.tuple)) {
		bpf_map_update_elem(&skip_socks, &key, &(__u32){SKIP_FILTERED}, BPF_ANY);
		return 0;
	}
	bpf_map_delete_elem(&skip_socks, &key); /* an earlier life on this memory */
	fresh.tuple.life = next_life();
	init_stats(&fresh.stats, dir, pid != 0, o);
	if (pid && guess_comm(fresh.stats.comm)) { /* another tracer's probe connection */
		bpf_map_update_elem(&skip_socks, &key, &(__u32){SKIP_FILTERED}, BPF_ANY);
		return 0;
	}
	fresh.stats.seen_start = seen_start;
	if (bpf_map_update_elem(&socks, &key, &fresh, BPF_NOEXIST)) {
		tele_add(TELE_CONN_LOST);
		bpf_map_update_elem(&skip_socks, &key, &(__u32){SKIP_LOST}, BPF_ANY);
		return 0;
	}
	si = bpf_map_lookup_elem(&socks, &key);
	if (si && si->has_tuple && si->tuple.pid)
		mark_dirty(&si->tuple, &si->stats, o, key);
	return si;
}

INLINE int read_state(const void *sk, struct offsets *o)
{
	__u8 state = 0;
	kread(&state, sizeof(state), sk + o->state);
	return state;
}

/* Name a TCP life that has no tuple yet (its connect() before
 * ESTABLISHED, data before it with fast open, a failed connect at
 * TCP_CLOSE), keeping its owner and life number; where the kernel has
 * already released skc_num, the port is inet_sport's.  Nonzero: the
 * socket cannot be read. */
INLINE int name_life(const void *sk, struct offsets *o, struct sock_info *si)
{
	__u32 pid = si->tuple.pid, life = si->tuple.life;
	__u16 sport = 0;

	if (read_tuple(sk, o, pid, TRACER_PROTO_TCP, &si->tuple))
		return -1;
	if (!si->tuple.sport && o->inet_sport) {
		kread(&sport, sizeof(sport), sk + o->inet_sport);
		si->tuple.sport = swap16(sport);
	}
	si->tuple.life = life;
	si->has_tuple = 1;
	return 0;
}

/* The event of a TCP life's end: connect_failed for one that never got
 * established, else close. */
INLINE void emit_end(struct offsets *o, struct sock_info *si)
{
	emit(o, si->stats.end >= END_REFUSED ? EV_CONNECT_FAILED : EV_CLOSE, &si->tuple, &si->stats);
}

/* Process context: the socks entry of sk, owned by the current process if
 * nobody owned it yet.  A socket the tracer never saw start is adopted
 * while its tuple is still valid. */
INLINE struct sock_info *claim_sock(const void *sk, struct offsets *o, __u32 tgid, __u8 dir_if_new)
{
	__u64 key = (__u64)sk;
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);

	if (si && si->tuple.proto != TRACER_PROTO_TCP)
		si = 0; /* a UDP socket's entry left in this memory: replaced */
	if (!si) {
		if (bpf_map_lookup_elem(&skip_socks, &key))
			return 0;
		if (read_state(sk, o) == TCP_CLOSE)
			return 0; /* the tuple is gone: nothing to name it by */
		si = new_life(sk, o, tgid, dir_if_new, 1, 0);
		if (!si)
			return 0;
	}
	if (!si->has_tuple && name_life(sk, o, si)) /* data before ESTABLISHED (fast open) */
		return 0;
	if (si->tuple.pid == 0) {
		if (o->pid_filter && tgid != o->pid_filter) { /* not the process traced */
			bpf_map_delete_elem(&socks, &key);
			bpf_map_update_elem(&skip_socks, &key, &(__u32){SKIP_FILTERED}, BPF_ANY);
			return 0;
		}
		si->tuple.pid = tgid;
		process_comm(si->stats.comm, o);
		if (guess_comm(si->stats.comm)) { /* another tracer's probe connection */
			bpf_map_delete_elem(&socks, &key);
			bpf_map_update_elem(&skip_socks, &key, &(__u32){SKIP_FILTERED}, BPF_ANY);
			return 0;
		}
		mark_dirty(&si->tuple, &si->stats, o, key);
		if (si->stats.direction == DIR_INCOMING && si->stats.seen_start) {
			read_rtt(sk, o, &si->stats);
			emit(o, EV_ACCEPT, &si->tuple, &si->stats);
			if (si->stats.state == CONN_CLOSED) /* it closed before its owner came */
				emit_end(o, si);
		}
	}
	return si;
}

/* Bytes moved by a process that is not the socket's owner (a socket
 * shared after fork): a conns record of its own, closed with the socket. */
INLINE void count_other(struct sock_info *si, struct offsets *o, __u32 tgid, __u64 sent, __u64 recv)
{
	struct conn_tuple t;
	struct conn_stats *s;
	int known = 0;

	__builtin_memcpy(&t, &si->tuple, sizeof(t));
	t.pid = tgid;
	if (!wanted(o, &t))
		return;
	s = bpf_map_lookup_elem(&conns, &t);
	if (!s) {
#pragma unroll
		for (int i = 0; i < SOCK_OTHERS; i++)
			if (si->others[i] == tgid)
				known = 1;
		if (!known) {
			int free = -1;
#pragma unroll
			for (int i = SOCK_OTHERS - 1; i >= 0; i--)
				if (!si->others[i])
					free = i;
			if (free == 0)
				si->others[0] = tgid;
			else if (free == 1)
				si->others[1] = tgid;
			else if (free == 2)
				si->others[2] = tgid;
			else
				tele_add(TELE_SHARED_OVERFLOW);
		}
		s = get_stats(&t, si->stats.direction, o, TELE_CLOSED_LOST);
		if (!s) {
			tele_addn(TELE_BYTES_LOST, sent + recv);
			return;
		}
		s->first_ns = si->stats.first_ns; /* the connection's start, not this process's first use */
		s->seen_start = si->stats.seen_start;
		if (si->stats.state == CONN_CLOSED)
			s->state = CONN_CLOSED;
	}
	add_bytes(&t, s, o, sent, recv, 0);
}

/* A TCP socket the tracer leaves alone (skip_socks): 1, with the bytes
 * of one it lost counted lost; 0 for any other. */
INLINE int tcp_skipped(const void *sk, __u64 sent, __u64 recv)
{
	__u64 key = (__u64)sk;
	__u32 *skip = bpf_map_lookup_elem(&skip_socks, &key);

	if (!skip)
		return 0;
	if (*skip == SKIP_LOST)
		tele_addn(TELE_BYTES_LOST, sent + recv);
	return 1;
}

INLINE void tcp_count(const void *sk, struct offsets *o, __u64 sent, __u64 recv)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct sock_info *si = claim_sock(sk, o, tgid, DIR_UNKNOWN);

	if (!si) { /* filtered out, or lost */
		tcp_skipped(sk, sent, recv);
		return;
	}
	if (si->tuple.pid == tgid)
		add_bytes(&si->tuple, &si->stats, o, sent, recv, (__u64)sk);
	else
		count_other(si, o, tgid, sent, recv);
}

/* Process context: after sock_sendmsg()'s protocol handler returned ret.
 * The hot path: one lookup of the socket's own socks entry.  A TCP
 * socket's holds its life and its owner's counters (tcp_hit: one compare
 * and the adds); a UDP socket's its first flow (udp_count).  Any other
 * case takes the longer way. */
INLINE void tcp_hit(const void *sk, struct sock_info *si, struct offsets *o, __u64 sent, __u64 recv)
{
	if (si->has_tuple && si->tuple.pid == (__u32)(bpf_get_current_pid_tgid() >> 32)) {
		__u64 was = si->stats.sent_bytes + si->stats.recv_bytes;
		if ((was ^ (was + sent + recv)) >> 16) /* each 64 KiB moved: the RTT again */
			read_rtt(sk, o, &si->stats);
		add_bytes(&si->tuple, &si->stats, o, sent, recv, (__u64)sk);
	} else
		tcp_count(sk, o, sent, recv);
}

/* kprobe backend: count the bytes sk's write_seq moved since it was last
 * counted (all queued by the current process: every send counts before
 * it lets the socket lock go).  si: sk's entry, with SEQ_SEND. */
INLINE void seq_send_settle(const void *sk, struct offsets *o, struct sock_info *si)
{
	__u32 now;

	if (bpf_probe_read_kernel(&now, sizeof(now), sk + o->write_seq)) {
		tele_add(TELE_READ_FAULTS);
		return;
	}
	__u32 moved = now - si->write_seq;
	si->write_seq = now;
	if (moved)
		tcp_hit(sk, si, o, moved, 0);
}

/* tcp_push(sk, ...): the end of every send that queued bytes (and before
 * it waits for memory).  A socket the tracer did not see start is
 * adopted: its bytes past where sending stood (sent_seq) are this send's
 * (exact for a send on an idle socket; a large one may have sent some
 * already). */
INLINE void seq_send(const void *sk, struct offsets *o)
{
	__u64 key = (__u64)sk;
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);

	if (!si || si->tuple.proto != TRACER_PROTO_TCP) {
		if (!si && tcp_skipped(sk, 0, 0))
			return;
		si = claim_sock(sk, o, bpf_get_current_pid_tgid() >> 32, DIR_UNKNOWN);
		if (!si || !(si->seq_flags & SEQ_SEND))
			return;
		if (o->sent_seq)
			kread(&si->write_seq, sizeof(si->write_seq), sk + o->sent_seq);
	}
	if (si->seq_flags & SEQ_SEND)
		seq_send_settle(sk, o, si);
}

/* tcp_cleanup_rbuf(sk, copied): the end of every read (and before it
 * sleeps for more); copied > 0.  A MSG_PEEK moves nothing.  Reading the
 * peer's FIN moves copied_seq by one more: then copied_seq reaches
 * rcv_nxt, which includes it.  A socket the tracer did not see start is
 * adopted with this read's bytes. */
INLINE void seq_recv(const void *sk, struct offsets *o, int copied)
{
	__u64 key = (__u64)sk;
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);
	__u32 now, nxt = 0;

	if (!si || si->tuple.proto != TRACER_PROTO_TCP) {
		if (!si && tcp_skipped(sk, 0, 0))
			return;
		si = claim_sock(sk, o, bpf_get_current_pid_tgid() >> 32, DIR_UNKNOWN);
		if (!si)
			return;
		si->copied_seq -= copied;
	}
	if (!(si->seq_flags & SEQ_RECV))
		return;
	if (bpf_probe_read_kernel(&now, sizeof(now), sk + o->copied_seq)) {
		tele_add(TELE_READ_FAULTS);
		return;
	}
	__u32 moved = now - si->copied_seq;
	si->copied_seq = now;
	if ((si->seq_flags & SEQ_FIN) && moved) {
		kread(&nxt, sizeof(nxt), sk + o->rcv_nxt);
		if (nxt == now) {
			si->seq_flags &= ~SEQ_FIN;
			moved--;
		}
	}
	if (moved)
		tcp_hit(sk, si, o, 0, moved);
}

INLINE void take_synack_retrans(struct sock_info *si)
{
	struct conn_tuple t;
	__u32 *n;

	__builtin_memcpy(&t, &si->tuple, sizeof(t));
	t.pid = 0;
	t.life = 0;
	n = bpf_map_lookup_elem(&synack_retrans, &t);
	if (n) {
		si->stats.retransmits += *n;
		bpf_map_delete_elem(&synack_retrans, &t);
	}
}

/* oldstate: the state left, or -1 (read from the socket when needed) */
/* seqs: the caller's backend counts TCP bytes from the sequence counters
 * (kprobe); a constant, so the tracepoint program carries none of that
 * (its verification took twice as long with it) */
INLINE void tcp_state(const void *sk, struct offsets *o, int newstate, int oldstate, int seqs)
{
	__u64 key = (__u64)sk;
	struct sock_info *si;

	if (newstate == TCP_SYN_SENT) { /* connect(), process context */
		new_life(sk, o, bpf_get_current_pid_tgid() >> 32, DIR_OUTGOING, 0, 1);
		return;
	}
	si = bpf_map_lookup_elem(&socks, &key);
	if (si && si->tuple.proto != TRACER_PROTO_TCP)
		si = 0; /* a UDP socket's entry left in this memory (new_life replaces it) */
	if (newstate == TCP_ESTABLISHED) {
		struct conn_tuple now;
		if (si && !si->has_tuple && si->stats.state == CONN_OPEN) { /* our connect() */
			if (name_life(sk, o, si))
				return;
			seq_baseline(sk, o, si);
			if (!wanted(o, &si->tuple)) { /* filtered out (family, port) */
				bpf_map_delete_elem(&socks, &key);
				bpf_map_update_elem(&skip_socks, &key, &(__u32){SKIP_FILTERED}, BPF_ANY);
				return;
			}
			mark_dirty(&si->tuple, &si->stats, o, key);
			read_rtt(sk, o, &si->stats);
			emit(o, EV_CONNECT, &si->tuple, &si->stats);
			return;
		}
		if (!si && bpf_map_lookup_elem(&skip_socks, &key))
			return; /* its connect() found the table full: counted then */
		if (read_tuple(sk, o, 0, TRACER_PROTO_TCP, &now))
			return;
		/* an open entry with this very tuple: data came first (fast
		 * open); anything else is an earlier life on this memory */
		if (si && si->has_tuple && si->stats.state == CONN_OPEN && same_tuple(&si->tuple, &now)) {
			if (!si->seq_flags) /* named before ESTABLISHED: counted from now */
				seq_baseline(sk, o, si);
			return;
		}
		si = new_life(sk, o, 0, DIR_INCOMING, 1, 1); /* passive open: owner known at accept or first use */
		if (si)
			take_synack_retrans(si);
		return;
	}
	if (!si)
		return;
	if (newstate == TCP_CLOSE_WAIT || newstate == TCP_CLOSING) { /* the peer's FIN came */
		si->seq_flags |= si->seq_flags & SEQ_RECV ? SEQ_FIN : 0;
		return;
	}
	if (newstate == TCP_FIN_WAIT1 || newstate == TCP_LAST_ACK) { /* close() or shutdown() */
		/* the bytes queued before our FIN, which takes a sequence number */
		if (seqs && (si->seq_flags & SEQ_SEND)) {
			seq_send_settle(sk, o, si);
			si->seq_flags &= ~SEQ_SEND;
		}
		if (si->tuple.pid == 0)
			claim_sock(sk, o, bpf_get_current_pid_tgid() >> 32, DIR_INCOMING);
		return;
	}
	if (newstate == TCP_CLOSE && si->stats.state != CONN_CLOSED) {
		if (oldstate < 0)
			oldstate = read_state(sk, o);
		si->stats.end = end_of(sk, o, oldstate);
		if (si->stats.end == END_RESET_SENT && si->tuple.pid == 0) {
			/* close() of a connection with unread data, in its process */
			si = claim_sock(sk, o, bpf_get_current_pid_tgid() >> 32, DIR_INCOMING);
			if (!si)
				return;
		}
		if (!si->has_tuple) { /* a connect() that never got established: named now */
			if (name_life(sk, o, si))
				return;
			if (!wanted(o, &si->tuple)) {
				bpf_map_delete_elem(&socks, &key);
				bpf_map_update_elem(&skip_socks, &key, &(__u32){SKIP_FILTERED}, BPF_ANY);
				return;
			}
		}
		/* nothing is sent after TCP_CLOSE (tcp_disconnect moves write_seq
		 * on); from FIN_WAIT2 without an error, the peer's FIN came */
		si->seq_flags &= ~SEQ_SEND;
		if (oldstate == TCP_FIN_WAIT2 && si->stats.end == END_FIN && (si->seq_flags & SEQ_RECV))
			si->seq_flags |= SEQ_FIN;
		read_rtt(sk, o, &si->stats);
		close_life(si, o, key);
		if (si->tuple.pid)
			emit_end(o, si);
	}
}

/* The kernel frees the socket: nothing can send or receive on it after. */
INLINE void tcp_destroy(const void *sk)
{
	__u64 key = (__u64)sk;
	struct offsets *o = ready_offsets();
	struct sock_info *si;

	if (!o)
		return;
	si = bpf_map_lookup_elem(&socks, &key);
	if (si)
		end_life(key, si, o);
	else
		bpf_map_delete_elem(&skip_socks, &key);
}

/* struct sk_buff: cb[] at 40 since 4.x (x86-64); struct tcp_skb_cb:
 * tcp_gso_segs (u16) at 8.  The kernel's tcpi_total_retrans adds
 * tcp_skb_pcount() per retransmitted skb. */
#define SKB_TCP_GSO_SEGS (40 + 8)

INLINE void tcp_retransmit(const void *sk, const void *skb)
{
	__u64 key = (__u64)sk;
	struct offsets *o = ready_offsets();
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);
	__u16 segs = 0;

	if (!o || !si || si->tuple.proto != TRACER_PROTO_TCP)
		return; /* SYN retransmits before our connect() entry: none */
	if (skb)
		kread(&segs, sizeof(segs), skb + SKB_TCP_GSO_SEGS);
	__sync_fetch_and_add(&si->stats.retransmits, segs ? segs : 1);
	read_rtt(sk, o, &si->stats);
	if (si->has_tuple && si->tuple.pid)
		mark_dirty(&si->tuple, &si->stats, o, key);
}

/* SYN-ACK retransmits of a connection not yet accepted: the kernel starts
 * the new socket's tcpi_total_retrans with them.  A request sock begins
 * with struct sock_common, so its tuple reads like a socket's. */

SEC("raw_tracepoint/tcp_retransmit_synack")
int tp_tcp_retransmit_synack(struct raw_args *ctx)
{
	struct offsets *o = ready_offsets();
	struct conn_tuple t;
	__u32 one = 1, *n;

	if (!o || read_tuple((void *)ctx->args[1], o, 0, TRACER_PROTO_TCP, &t))
		return 0;
	n = bpf_map_lookup_elem(&synack_retrans, &t);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&synack_retrans, &t, &one, BPF_ANY);
	return 0;
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

/* The source of a received datagram, from the headers before its payload
 * (skb->data points at the payload once UDP has queued it). */
#define SKB_HDRS 72
#define IPV6_EXT_MAX 32 /* 8-byte units of extension headers looked through */
_Static_assert(8 * IPV6_EXT_MAX + 24 <= SCRATCH_BYTES && SKC_BLOCK + 16 <= SCRATCH_BYTES,
	       "skc_copy holds a struct sock block or the bytes before an IPv6 datagram's UDP header");

/* IPv6 with extension headers (hop-by-hop, destination options, routing)
 * between its header and UDP's: the IPv6 header is the one 8 * k bytes
 * further back whose payload length is those 8 * k bytes plus UDP's
 * length.  h: the SKB_HDRS bytes before data (UDP's header at the end). */
INLINE int peer_from_ipv6_ext(struct peer *p, unsigned long data, const __u8 *h)
{
	__u16 udp_len = ((__u16)h[SKB_HDRS - 4] << 8) | h[SKB_HDRS - 3];
	__u32 zero = 0;
	__u8 *b = bpf_map_lookup_elem(&skc_copy, &zero);

	/* one read: the 8 * IPV6_EXT_MAX bytes before where an IPv6 header
	 * with no extension would start, and the 24 after (the first
	 * candidate's fixed part and source address); the candidates are
	 * then looked at in place, no helper call each */
	if (!b || bpf_probe_read_kernel(b, 8 * IPV6_EXT_MAX + 24, (void *)(data - 8 - 40 - 8 * IPV6_EXT_MAX)))
		return 0;
#pragma unroll
	for (int k = 1; k <= IPV6_EXT_MAX; k++) {
		const __u8 *ip6 = b + 8 * IPV6_EXT_MAX - 8 * k;
		if ((ip6[0] >> 4) == 6 && (((__u16)ip6[4] << 8) | ip6[5]) == 8 * k + udp_len) {
			__builtin_memcpy(p->addr, ip6 + 8, 16);
			p->family = 6;
			return 1;
		}
	}
	return 0;
}
INLINE void peer_from_skb(struct peer *p, const void *skb, struct offsets *o)
{
	unsigned long data = 0;
	__u8 h[SKB_HDRS];

	__builtin_memset(p, 0, sizeof(*p));
	if (!o->skb_data || bpf_probe_read_kernel(&data, sizeof(data), skb + o->skb_data) || !data ||
	    bpf_probe_read_kernel(h, sizeof(h), (void *)(data - SKB_HDRS)))
		return;
	/* UDP header at SKB_HDRS - 8; IPv6 (40 bytes) or IPv4 (4 * IHL) before it */
	if ((h[SKB_HDRS - 48] >> 4) == 6 && h[SKB_HDRS - 48 + 6] == TRACER_PROTO_UDP) {
		p->family = 6;
		__builtin_memcpy(p->addr, h + SKB_HDRS - 48 + 8, 16);
	} else {
#pragma unroll
		for (int ihl = 5; ihl <= 15; ihl++) {
			int at = SKB_HDRS - 8 - 4 * ihl;
			if (h[at] == (0x40 | ihl) && h[at + 9] == TRACER_PROTO_UDP) {
				p->family = 4;
				__builtin_memcpy(p->addr, h + at + 12, 4);
				break;
			}
		}
		if (!p->family && !peer_from_ipv6_ext(p, data, h))
			return;
	}
	p->port = ((__u16)h[SKB_HDRS - 8] << 8) | h[SKB_HDRS - 7];
}

/* struct sk_buff_head: next, prev, qlen (u32): one probe read */
INLINE unsigned long queue_head(const void *sk, __u32 off, __u32 *qlen)
{
	unsigned long q[3];
	__u32 n;

	if (bpf_probe_read_kernel(q, 20, sk + off))
		return 0;
	n = (__u32)q[2];
	if (!n)
		return 0;
	*qlen += n;
	return q[0];
}

/* Remember the source of the next datagram a read of sk will return: the
 * head of udp_sock's reader_queue, else of sk_receive_queue (a read moves
 * the whole receive queue to the reader queue when that is empty).  only_if:
 * with only_if 1, leave a remembered peer alone unless the queue holds just
 * the datagram that was queued now (the socket was empty before). */
INLINE void note_next_peer_at(const void *sk, struct offsets *o, int only_if, struct peer *cur)
{
	__u64 key = (__u64)sk;
	unsigned long skb, skb2;
	__u32 qlen = 0;
	struct peer p = {};

	skb = queue_head(sk, o->udp_readerq, &qlen);
	skb2 = queue_head(sk, o->sk_rcvq, &qlen);
	if (!skb)
		skb = skb2;

	if (only_if && qlen > 1 && cur && cur->family)
		return;
	if (skb)
		peer_from_skb(&p, (void *)skb, o);
	if (cur) /* in place (family 0: none known): no map update per datagram */
		__builtin_memcpy(cur, &p, sizeof(p));
	else if (p.family)
		bpf_map_update_elem(&udp_next, &key, &p, BPF_ANY);
}

INLINE void note_next_peer(const void *sk, struct offsets *o, int only_if)
{
	__u64 key = (__u64)sk;
	note_next_peer_at(sk, o, only_if, bpf_map_lookup_elem(&udp_next, &key));
}

/* The thread's stash entry, written in place where it has one (keeping
 * its sent_to). */
INLINE void stash_put(struct stash *st)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *cur = bpf_map_lookup_elem(&stash, &id);

	if (cur)
		__builtin_memcpy(cur, st, __builtin_offsetof(struct stash, sent_to));
	else if (bpf_map_update_elem(&stash, &id, st, BPF_ANY))
		tele_add(TELE_STASH_LOST);
}

/* Taken: empty until the thread's next stash_put. */
INLINE void stash_clear(struct stash *st)
{
	st->sk = 0;
	st->uaddr = 0;
	st->has_peer = 0;
}

/* The message's peer p (family 0: none) into t, for an unconnected
 * socket.  -1: a v6 peer for a v4 socket (cannot happen). */
INLINE int apply_peer(struct conn_tuple *t, struct peer *p)
{
	if (!p->family || t->dport != 0)
		return 0;
	if (p->family == 6 || t->family == 6) {
		if (t->family == 4) /* cannot happen for a v4 socket */
			return -1;
		__builtin_memcpy(t->daddr, p->addr, 16);
		if (p->family == 4) { /* only for v4 peers of v4-mapped v6 sockets */
			__builtin_memset(t->daddr, 0, 16);
			__builtin_memcpy(t->daddr + 12, p->addr, 4);
			t->daddr[10] = 0xff;
			t->daddr[11] = 0xff;
		}
		t->family = 6;
		unmap_v4(t);
	} else {
		__builtin_memcpy(t->daddr, p->addr, 4);
	}
	t->dport = p->port;
	return 0;
}

/* A UDP socket's own socks entry (its tuple's proto is UDP): the first
 * flow (process, local and remote address and port) the socket carried,
 * under a life number of its own, so that its datagrams are one lookup
 * on the socket's address and one probe read of the start of struct sock
 * (to check that the socket still has that tuple: it may be connected
 * elsewhere, or be a new socket in the same memory).  Other flows of the
 * socket (other peers of an unconnected socket, other processes) are
 * conns records as before.  others[0..1] hold the socket's struct net
 * pointer (the namespace is compared without reading its inode). */
INLINE unsigned long udp_entry_net(struct sock_info *si)
{
	unsigned long net;
	__builtin_memcpy(&net, si->others, sizeof(net));
	return net;
}

INLINE int same_flow(const struct conn_tuple *a, const struct conn_tuple *b)
{
	return !differ16(a->saddr, b->saddr) && !differ16(a->daddr, b->daddr) &&
	       a->sport == b->sport && a->dport == b->dport && a->family == b->family;
}

INLINE int udp_entry_is(struct sock_info *si, const struct conn_tuple *t, unsigned long net)
{
	return si->tuple.proto == TRACER_PROTO_UDP && si->tuple.pid == t->pid &&
	       udp_entry_net(si) == net && same_flow(&si->tuple, t);
}

/* The socket has no entry: make t (netns read) its flow, unless t already
 * has a conns record (it stays there: one record per flow). */
INLINE struct sock_info *udp_home(__u64 key, struct offsets *o, struct conn_tuple *t, unsigned long net, __u8 dir)
{
	struct sock_info fresh = {};
	struct sock_info *si;

	if (bpf_map_lookup_elem(&conns, t))
		return 0;
	__builtin_memcpy(&fresh.tuple, t, sizeof(fresh.tuple));
	fresh.tuple.life = next_life();
	fresh.has_tuple = 1;
	__builtin_memcpy(fresh.others, &net, sizeof(net));
	init_stats(&fresh.stats, dir, 1, o);
	long err = bpf_map_update_elem(&socks, &key, &fresh, BPF_NOEXIST);
	si = bpf_map_lookup_elem(&socks, &key); /* ours, or one another CPU made first */
	if (si && udp_entry_is(si, t, net)) {
		if (!err)
			emit(o, EV_UDP_OPEN, &si->tuple, &si->stats);
		return si;
	}
	return 0;
}

/* The peer of a socket's last addressed send that succeeded, in the
 * sending thread's stash entry (sent_sk, sent_to); when the thread sends
 * from another socket, the one it held moves to udp_sent.  A thread that
 * sends from one socket does no map update. */
INLINE void remember_sent_to(struct stash *st, __u64 key, struct peer *p)
{
	if (st->sent_sk != key) {
		if (st->sent_sk)
			bpf_map_update_elem(&udp_sent, &st->sent_sk, &st->sent_to, BPF_ANY);
		st->sent_sk = key;
	}
	__builtin_memcpy(&st->sent_to, p, sizeof(*p));
}

/* st: the thread's stash entry, or NULL */
INLINE void sent_to(struct stash *st, __u64 key, struct peer *p)
{
	struct peer *q;

	if (st && st->sent_sk == key) {
		__builtin_memcpy(p, &st->sent_to, sizeof(*p));
		return;
	}
	q = bpf_map_lookup_elem(&udp_sent, &key);
	if (q)
		__builtin_memcpy(p, q, sizeof(*p));
}

/* udp_count's how: */
#define UDP_STASH 1 /* an unconnected socket's peer is the message's, in the thread's stash
		     * (tracepoint backend: left by the cgroup hook or sys_enter) */
#define UDP_NOTE 2  /* else, for a receive, the note of the datagram that was at the head of
		     * the queue, which is then moved on (tracepoint backend) */

/* p: the message's peer (family 0: none).  Never NULL: clang turns a NULL
 * check of it into code that older verifiers (5.10, 6.1) reject.  si: the
 * socket's socks entry (NULL: none).  how: UDP_* bits.  skb: a received
 * datagram whose headers give the peer of an unconnected socket (read only
 * then: a connected socket's peer is its own); NULL: none. */
INLINE void udp_count(const void *sk, struct offsets *o, __u64 sent, __u64 recv, struct peer *p,
		      struct sock_info *si, int how, const void *skb)
{
	struct conn_tuple t;
	struct conn_stats *s;
	unsigned long net = 0;
	__u64 key = (__u64)sk;
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;

	if (!(how & UDP_NOTE) && o->pid_filter && tgid != o->pid_filter)
		return; /* before reading anything (what its cgroup hook left is this process's only) */
	if (read_tuple_net(sk, o, tgid, TRACER_PROTO_UDP, &t, &net))
		return;
	if (skb && t.dport == 0) {
		peer_from_skb(p, skb, o);
		if (!p->family)
			tele_add(TELE_PENDING_LOST);
	}
	/* a connected socket's peer is its own: the cgroup hooks leave
	 * nothing for it, and the stash is not looked at */
	if ((how & UDP_STASH) && t.dport == 0) {
		struct stash *st = bpf_map_lookup_elem(&stash, &id);
		if (st) {
			if (st->uaddr && recv) { /* the peer is copied to the user after this: sys_exit counts */
				st->sk = key;
				st->bytes = recv;
				return;
			}
			if (st->has_peer) {
				__builtin_memcpy(p, &st->peer, sizeof(*p));
				stash_clear(st);
				if (sent)
					remember_sent_to(st, key, p);
			} else if (sent) {
				/* no hook ran: the call appended to the datagram the
				 * last addressed send on sk left pending (MSG_MORE,
				 * UDP_CORK) */
				sent_to(st, key, p);
			}
		} else if (sent) {
			sent_to(0, key, p);
		}
		if (sent && !p->family)
			tele_add(TELE_PENDING_LOST);
	}
	if ((how & UDP_NOTE) && t.dport == 0) { /* unconnected: the peer noted when this datagram came to the head */
		struct peer *next = bpf_map_lookup_elem(&udp_next, &key);
		if (!p->family) {
			if (next && next->family)
				__builtin_memcpy(p, next, sizeof(*p));
			else
				tele_add(TELE_PENDING_LOST);
		}
		note_next_peer_at(sk, o, 0, next);
	}
	if (o->pid_filter && tgid != o->pid_filter)
		return;
	if (apply_peer(&t, p))
		return;
	if (si && udp_entry_is(si, &t, net)) { /* the hot path: the socket's own flow */
		add_bytes(&si->tuple, &si->stats, o, sent, recv, key);
		return;
	}
	read_netns(&t, net, o);
	if (!wanted(o, &t))
		return;
	if (!si) {
		/* (a probe socket of another tracer never gets an entry, so
		 * its datagrams all come this way; others only until theirs) */
		if (by_guesser(o))
			return;
		si = udp_home(key, o, &t, net, sent ? DIR_OUTGOING : DIR_INCOMING);
		if (si) {
			add_bytes(&si->tuple, &si->stats, o, sent, recv, key);
			return;
		}
	}
	s = get_stats(&t, sent ? DIR_OUTGOING : DIR_INCOMING, o, TELE_UDP_LOST);
	if (s)
		add_bytes(&t, s, o, sent, recv, 0);
	else
		tele_addn(TELE_BYTES_LOST, sent + recv);
}

/* The same, where the socket's entry was not looked up yet (kprobe backend,
 * syscall fallback). */
INLINE void udp_count_sk(const void *sk, struct offsets *o, __u64 sent, __u64 recv, struct peer *p,
			 const void *skb)
{
	__u64 key = (__u64)sk;
	struct sock_info *si = bpf_map_lookup_elem(&socks, &key);

	if (si && si->tuple.proto != TRACER_PROTO_UDP)
		si = 0;
	udp_count(sk, o, sent, recv, p, si, 0, skb);
}

/* ------------------------------------------------------------------ */
/* offset guessing: dump the raw struct sock seen in the guessing thread */

/* newstate: the state sk enters (from inet_sock_set_state), or -1 */
INLINE void guess_sk(const void *sk, int newstate)
{
	__u32 zero = 0;
	struct guess_req *g = bpf_map_lookup_elem(&guess_req, &zero);
	struct guess_dump *d;
	unsigned long net = 0;

	if (!g || g->pid_tgid != bpf_get_current_pid_tgid())
		return;
	if ((g->mode == GUESS_STATE) != (newstate >= 0) || (newstate >= 0 && newstate != g->state) ||
	    g->mode == GUESS_SEND_SKB)
		return;
	d = bpf_map_lookup_elem(&guess_dump, &zero);
	if (!d)
		return;
	if (g->mode == GUESS_QSKB_AT) { /* the first queued datagram's bytes */
		unsigned long skb = 0, at = 0;
		bpf_probe_read_kernel(&skb, sizeof(skb), sk + (g->net_off & 0xffff));
		bpf_probe_read_kernel(&at, sizeof(at), (void *)(skb + (g->net_off >> 16)));
		d->sk = at - GUESS_SKB_BEFORE;
		d->sk_ok = !bpf_probe_read_kernel(d->sk_bytes, GUESS_CHUNK, (void *)d->sk);
		d->net_ok = 0;
		d->seq = g->seq;
		return;
	}
	if (g->mode != GUESS_SOCK && g->mode != GUESS_STATE) { /* the task_struct: process names */
		unsigned long task = bpf_get_current_task();
		if (g->mode == GUESS_TASK_AT) {
			unsigned long at = 0;
			bpf_probe_read_kernel(&at, sizeof(at), (void *)(task + g->net_off));
			task = at;
		}
		d->sk = task;
		d->sk_ok = 0;
		d->net_ok = 0;
#pragma unroll
		for (int i = 0; i < GUESS_SK_BYTES / GUESS_CHUNK; i++)
			if (task && !bpf_probe_read_kernel(d->sk_bytes + i * GUESS_CHUNK, GUESS_CHUNK, (void *)(task + i * GUESS_CHUNK)))
				d->sk_ok |= 1 << i;
#pragma unroll
		for (int i = 0; i < GUESS_NET_BYTES / GUESS_CHUNK; i++)
			if (task && !bpf_probe_read_kernel(d->net_bytes + i * GUESS_CHUNK, GUESS_CHUNK, (void *)(task + GUESS_SK_BYTES + i * GUESS_CHUNK)))
				d->net_ok |= 1 << i;
		d->seq = g->seq;
		return;
	}
	d->sk = (__u64)sk;
	d->sk_ok = 0;
	d->net_ok = 0;
#pragma unroll
	for (int i = 0; i < GUESS_SK_BYTES / GUESS_CHUNK; i++)
		if (!bpf_probe_read_kernel(d->sk_bytes + i * GUESS_CHUNK, GUESS_CHUNK, sk + i * GUESS_CHUNK))
			d->sk_ok |= 1 << i;
	if (g->net_off && g->net_off < GUESS_SK_BYTES && g->mode == GUESS_SOCK) {
		bpf_probe_read_kernel(&net, sizeof(net), sk + g->net_off);
#pragma unroll
		for (int i = 0; i < GUESS_NET_BYTES / GUESS_CHUNK; i++)
			if (net && !bpf_probe_read_kernel(d->net_bytes + i * GUESS_CHUNK, GUESS_CHUNK, (void *)(net + i * GUESS_CHUNK)))
				d->net_ok |= 1 << i;
	} else { /* the rest of a struct tcp_sock, past the first GUESS_SK_BYTES */
#pragma unroll
		for (int i = 0; i < GUESS_NET_BYTES / GUESS_CHUNK; i++)
			if (!bpf_probe_read_kernel(d->net_bytes + i * GUESS_CHUNK, GUESS_CHUNK, sk + GUESS_SK_BYTES + i * GUESS_CHUNK))
				d->net_ok |= 1 << i;
	}
	d->seq = g->seq;
}

/* skb_consume_udp(sk, skb, len): the datagram just copied to the user.
 * GUESS_SOCK dumps the sk_buff itself; GUESS_SKB_AT the bytes around a
 * pointer in it (the payload, when that pointer is skb->data). */
/* both backends: the socket as it enters a state (sk_err set by a reset
 * or a timeout, the RTT before a FIN) */
SEC("raw_tracepoint/inet_sock_set_state")
int guess_inet_sock_set_state(struct raw_args *ctx)
{
	guess_sk((void *)ctx->args[0], (int)ctx->args[2]);
	return 0;
}

SEC("kprobe/skb_consume_udp")
int guess_skb_consume_udp(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct guess_req *g = bpf_map_lookup_elem(&guess_req, &zero);
	struct guess_dump *d;
	unsigned long skb = PARM2(ctx), at = 0;

	if (!g || g->pid_tgid != bpf_get_current_pid_tgid())
		return 0;
	d = bpf_map_lookup_elem(&guess_dump, &zero);
	if (!d)
		return 0;
	if (g->mode == GUESS_SKB_AT) {
		bpf_probe_read_kernel(&at, sizeof(at), (void *)(skb + g->net_off));
		skb = at - GUESS_SKB_BEFORE;
	} else if (g->mode != GUESS_SOCK) {
		return 0;
	}
	d->sk = skb;
	d->sk_ok = !bpf_probe_read_kernel(d->sk_bytes, GUESS_CHUNK, (void *)skb);
	d->net_ok = 0;
	d->seq = g->seq;
	return 0;
}

SEC("raw_tracepoint/sock_send_length")
int guess_sock_send_length(struct raw_args *ctx)
{
	guess_sk((void *)ctx->args[0], -1);
	return 0;
}

SEC("kprobe/udp_sendmsg")
int guess_udp_sendmsg(struct pt_regs *ctx)
{
	guess_sk((void *)PARM1(ctx), -1);
	return 0;
}

SEC("kprobe/tcp_sendmsg")
int guess_tcp_sendmsg(struct pt_regs *ctx)
{
	guess_sk((void *)PARM1(ctx), -1);
	return 0;
}

/* udp_send_skb(skb, fl4, cork) / udp_v6_send_skb(skb, fl6, cork), in
 * GUESS_SEND_SKB mode: the sk_buff's first GUESS_CHUNK bytes, and the
 * flow's in the second area */
INLINE void guess_send_skb(struct pt_regs *ctx)
{
	__u32 zero = 0;
	struct guess_req *g = bpf_map_lookup_elem(&guess_req, &zero);
	struct guess_dump *d;

	if (!g || g->pid_tgid != bpf_get_current_pid_tgid() || g->mode != GUESS_SEND_SKB)
		return;
	d = bpf_map_lookup_elem(&guess_dump, &zero);
	if (!d)
		return;
	d->sk = PARM1(ctx);
	d->sk_ok = !bpf_probe_read_kernel(d->sk_bytes, GUESS_CHUNK, (void *)PARM1(ctx));
	d->net_ok = !bpf_probe_read_kernel(d->net_bytes, GUESS_CHUNK, (void *)PARM2(ctx));
	d->seq = g->seq;
}

SEC("kprobe/udp_send_skb")
int guess_udp_send_skb(struct pt_regs *ctx)
{
	guess_send_skb(ctx);
	return 0;
}

SEC("kprobe/udp_v6_send_skb")
int guess_udp_v6_send_skb(struct pt_regs *ctx)
{
	guess_send_skb(ctx);
	return 0;
}

/* ------------------------------------------------------------------ */
/* tracepoint backend */


INLINE void on_send_length(const void *sk, long ret)
{
	struct offsets *o = ready_offsets();
	__u64 id = bpf_get_current_pid_tgid();
	__u64 key = (__u64)sk;
	struct sock_info *si;
	struct stash *st;
	struct peer peer = {};

	if (!o)
		return;
	si = bpf_map_lookup_elem(&socks, &key);
	if (si) {
		if (si->tuple.proto == TRACER_PROTO_TCP) {
			if (ret > 0)
				tcp_hit(sk, si, o, ret, 0);
			return;
		}
	} else {
		__u16 proto = read_protocol(sk, o);
		if (o->want && !(o->want & (proto == TRACER_PROTO_TCP ? WANT_TCP : WANT_UDP)))
			return;
		if (proto == TRACER_PROTO_TCP) {
			/* (a socket filtered out: one lookup, not claim_sock's) */
			if (ret > 0 && !tcp_skipped(sk, ret, 0))
				tcp_count(sk, o, ret, 0);
			return;
		}
		if (proto != TRACER_PROTO_UDP)
			return;
	}
	if (ret > 0) {
		udp_count(sk, o, ret, 0, &peer, si, UDP_STASH, 0);
		return;
	}
	st = bpf_map_lookup_elem(&stash, &id); /* a failed send: what its hook left goes */
	if (st)
		stash_clear(st);
}

INLINE void on_recv_length(const void *sk, long ret, long flags)
{
	struct offsets *o = ready_offsets();
	__u64 key = (__u64)sk;
	struct sock_info *si;
	struct peer none = {};

	/* MSG_ERRQUEUE: the socket's own error queue (our datagram back
	 * from an ICMP error, a timestamped copy of a packet we sent), not
	 * the peer's data */
	if (!o || ret <= 0 || (flags & (MSG_PEEK | MSG_ERRQUEUE)))
		return;
	si = bpf_map_lookup_elem(&socks, &key);
	if (si) {
		if (si->tuple.proto == TRACER_PROTO_TCP) {
			tcp_hit(sk, si, o, 0, ret);
			return;
		}
	} else {
		__u16 proto = read_protocol(sk, o);
		if (o->want && !(o->want & (proto == TRACER_PROTO_TCP ? WANT_TCP : WANT_UDP)))
			return;
		if (proto == TRACER_PROTO_TCP) {
			if (!tcp_skipped(sk, 0, ret))
				tcp_count(sk, o, 0, ret);
			return;
		}
		if (proto != TRACER_PROTO_UDP)
			return;
	}
	udp_count(sk, o, 0, ret, &none, si, o->sk_rcvq ? UDP_STASH | UDP_NOTE : UDP_STASH, 0);
}

/* A datagram (or TCP data) was queued on sk: for an unconnected UDP
 * socket whose queue was empty, note the source of its head. */
SEC("raw_tracepoint/sk_data_ready")
int tp_sk_data_ready(struct raw_args *ctx)
{
	const void *sk = (void *)ctx->args[0];
	struct offsets *o = ready_offsets();
	__u64 key = (__u64)sk;
	struct peer *cur;
	__u16 dport = 1, family = 0;
	__u32 d;
	__u64 w = 1;

	if (!o || !o->sk_rcvq)
		return 0;
	/* the remote port and the family: one read where they lie within 8
	 * bytes (sock_common: skc_dport, skc_num, skc_family) */
	d = o->family - o->dport;
	if (d <= 6) {
		kread(&w, sizeof(w), sk + o->dport);
		dport = (__u16)w;
		family = (__u16)(w >> (8 * d));
	} else {
		kread(&dport, sizeof(dport), sk + o->dport);
		kread(&family, sizeof(family), sk + o->family);
	}
	if (dport || (family != AF_INET && family != AF_INET6))
		return 0; /* TCP data, connected UDP, unix and other sockets: one read */
	/* an unconnected socket with a note is UDP (a TCP listener in the
	 * memory of a UDP socket that had one only costs a note nobody reads) */
	cur = bpf_map_lookup_elem(&udp_next, &key);
	if (cur || read_protocol(sk, o) == TRACER_PROTO_UDP)
		note_next_peer_at(sk, o, 1, cur);
	return 0;
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
	tcp_retransmit((void *)ctx->args[0], (void *)ctx->args[1]);
	return 0;
}

/* From 6.13 the tracepoint also fires for retransmits that failed before
 * the kernel counted them (err != 0). */
SEC("raw_tracepoint/tcp_retransmit_skb")
int tp_tcp_retransmit_skb_err(struct raw_args *ctx)
{
	if ((int)ctx->args[2] == 0)
		tcp_retransmit((void *)ctx->args[0], (void *)ctx->args[1]);
	return 0;
}

SEC("raw_tracepoint/tcp_destroy_sock")
int tp_tcp_destroy_sock(struct raw_args *ctx)
{
	tcp_destroy((void *)ctx->args[0]);
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
	unsigned long sk = 0, skb = 0;
	tp_read(ctx, TPF_RETRANS_SKADDR, &sk, sizeof(sk));
	tp_read(ctx, TPF_RETRANS_SKBADDR, &skb, sizeof(skb));
	tcp_retransmit((void *)sk, (void *)skb);
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
	int newstate = 0, oldstate = -1;
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
	if (newstate == TCP_CLOSE)
		tp_read(ctx, TPF_ISS_OLDSTATE, &oldstate, sizeof(oldstate));
	tcp_state((void *)sk, o, newstate, oldstate, 0);
	return 0;
}

/* syscalls: the peer address of unconnected UDP. */

/* cgroup sock_addr hooks (attached to the cgroup2 root, always allowing):
 * the kernel runs them only for UDP calls that carry an address (sendto or
 * sendmsg with a name on an unconnected socket; recvfrom or recvmsg asking
 * for the source), inside the call, before sock_send_length or
 * sock_recv_length fires; nothing else pays for them. */
struct bpf_sock {
	__u32 bound_dev_if;
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 mark;
	__u32 priority;
	__u32 src_ip4;
	__u32 src_ip6[4];
	__u32 src_port;
	__u16 dst_port;      /* network order; 0: not connected */
};

struct bpf_sock_addr {
	__u32 user_family;
	__u32 user_ip4;      /* network order */
	__u32 user_ip6[4];
	__u32 user_port;     /* network order, in the low 16 bits */
	__u32 family;
	__u32 type;
	__u32 protocol;
	__u32 msg_src_ip4;
	__u32 msg_src_ip6[4];
	struct bpf_sock *sk __attribute__((aligned(8)));
};

/* The message's peer into the thread's stash entry (in place where it has one). */
INLINE void stash_peer(struct peer *p)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *cur = bpf_map_lookup_elem(&stash, &id);
	struct stash st = {};

	if (cur) {
		__builtin_memcpy(&cur->peer, p, sizeof(*p));
		cur->sk = 0;
		cur->uaddr = 0;
		cur->has_peer = 1;
		return;
	}
	__builtin_memcpy(&st.peer, p, sizeof(*p));
	st.has_peer = 1;
	if (bpf_map_update_elem(&stash, &id, &st, BPF_ANY))
		tele_add(TELE_STASH_LOST);
}

INLINE void stash_peer4(struct bpf_sock_addr *ctx)
{
	struct peer p = {};
	__u32 ip, port;

	if (ctx->sk->dst_port) /* connected: its peer is its own (recvfrom, sendto elsewhere) */
		return;
	ip = ctx->user_ip4;
	port = ctx->user_port;
	p.family = 4;
	__builtin_memcpy(p.addr, &ip, 4);
	p.port = swap16((__u16)port);
	stash_peer(&p);
}

INLINE void stash_peer6(struct bpf_sock_addr *ctx)
{
	struct peer p = {};
	__u32 ip[4], port;

	if (ctx->sk->dst_port) /* connected: its peer is its own */
		return;
	port = ctx->user_port;
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	p.family = 6;
	__builtin_memcpy(p.addr, ip, 16);
	p.port = swap16((__u16)port);
	stash_peer(&p);
}

SEC("cgroup/sendmsg4")
int cg_sendmsg4(struct bpf_sock_addr *ctx)
{
	stash_peer4(ctx);
	return 1;
}

SEC("cgroup/sendmsg6")
int cg_sendmsg6(struct bpf_sock_addr *ctx)
{
	stash_peer6(ctx);
	return 1;
}

SEC("cgroup/recvmsg4")
int cg_recvmsg4(struct bpf_sock_addr *ctx)
{
	stash_peer4(ctx);
	return 1;
}

SEC("cgroup/recvmsg6")
int cg_recvmsg6(struct bpf_sock_addr *ctx)
{
	stash_peer6(ctx);
	return 1;
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
		udp_count_sk((void *)st->sk, o, 0, st->bytes, &p, 0);
	}
	stash_clear(st);
}

/* The end of sendto/sendmsg: what sys_enter stashed for a socket that is
 * not UDP (AF_UNIX, netlink: no sock_send_length took it) goes. */
INLINE void drop_stash(void)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *st = bpf_map_lookup_elem(&stash, &id);

	if (st)
		stash_clear(st);
}

SEC("tracepoint/syscalls/sys_exit_sendto")
int tp_sys_exit_sendto(void *ctx)
{
	drop_stash();
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_sendmsg")
int tp_sys_exit_sendmsg(void *ctx)
{
	drop_stash();
	return 0;
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

/* The socket the thread's kprobe stashed (0: none, or taken already),
 * and its flags. */
INLINE __u64 stash_take(long *flags)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct stash *st = bpf_map_lookup_elem(&stash, &id);
	__u64 sk;

	if (!st || !st->sk)
		return 0;
	sk = st->sk;
	*flags = st->flags;
	stash_clear(st);
	return sk;
}

SEC("kprobe/tcp_set_state")
int kp_tcp_set_state(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	if (o)
		tcp_state((void *)PARM1(ctx), o, (int)PARM2(ctx), -1, 1);
	return 0;
}

SEC("kretprobe/inet_csk_accept")
int krp_inet_csk_accept(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	void *sk = (void *)RC(ctx);
	if (o && sk)
		claim_sock(sk, o, bpf_get_current_pid_tgid() >> 32, DIR_INCOMING);
	return 0;
}

SEC("kprobe/tcp_push")
int kp_tcp_push(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	if (o)
		seq_send((void *)PARM1(ctx), o);
	return 0;
}

SEC("kprobe/tcp_cleanup_rbuf")
int kp_tcp_cleanup_rbuf(struct pt_regs *ctx)
{
	struct offsets *o;
	int copied = (int)PARM2(ctx);

	if (copied <= 0) /* nothing read (the call before a blocking read sleeps) */
		return 0;
	o = ready_offsets();
	if (o)
		seq_recv((void *)PARM1(ctx), o, copied);
	return 0;
}

/* The sequence counters' fallback, for a kernel without those two hooks:
 * each call's return value, from a kprobe/kretprobe pair. */
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
	long flags = 0;
	__u64 sk = stash_take(&flags);
	long ret = (int)RC(ctx); /* these functions return int: -EAGAIN is not 4294967285 */
	if (o && sk && ret > 0)
		tcp_count((void *)sk, o, ret, 0);
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
	long flags = 0;
	__u64 sk = stash_take(&flags);
	long ret = (int)RC(ctx); /* these functions return int: -EAGAIN is not 4294967285 */
	if (o && sk && ret > 0 && !(flags & (MSG_PEEK | MSG_ERRQUEUE)))
		tcp_count((void *)sk, o, 0, ret);
	return 0;
}

/* udp_send_skb(skb, fl4, cork) / udp_v6_send_skb(skb, fl6, cork): one UDP
 * datagram handed to IP, once per datagram (an uncorked send from
 * udp(v6)_sendmsg; a corked one, MSG_MORE or UDP_CORK, from
 * udp(_v6)_push_pending_frames), in the sender's process context.  The
 * socket is skb->sk; the peer is the flow's daddr and dport (the message
 * address of an unconnected socket's sendto(), else the socket's own);
 * the payload is skb->len minus the transport offset (head +
 * transport_header - data: the IP header and its options) minus the UDP
 * header.  One kprobe, no kretprobe, no stash.  Counted before
 * ip_send_skb(): a datagram that IP then refuses (a firewall drop: EPERM)
 * is counted although the call failed (README, "What is counted"). */
INLINE void udp_sent_skb(struct pt_regs *ctx, __u8 family)
{
	struct offsets *o = ready_offsets();
	__u32 fl_daddr, fl_dport;
	const void *skb = (void *)PARM1(ctx);
	__u32 zero = 0, len;
	__u8 *b = bpf_map_lookup_elem(&skc_copy, &zero);
	unsigned long sk = 0, head, data;
	__u16 th, port;
	long payload;
	struct peer p = {};

	if (!o || !o->skb_len || !b)
		return;
	fl_daddr = family == 4 ? o->fl4_daddr : o->fl6_daddr;
	fl_dport = family == 4 ? o->fl4_dport : o->fl6_dport;
	if (bpf_probe_read_kernel(&sk, sizeof(sk), skb + o->skb_sk) || !sk ||
	    bpf_probe_read_kernel(b, SKC_BLOCK, skb + o->skb_len)) {
		tele_add(TELE_READ_FAULTS);
		return;
	}
	__builtin_memcpy(&len, b, 4);
	__builtin_memcpy(&th, b + ((o->skb_thdr - o->skb_len) & (SKC_BLOCK - 1)), 2);
	__builtin_memcpy(&head, b + ((o->skb_head - o->skb_len) & (SKC_BLOCK - 1)), 8);
	__builtin_memcpy(&data, b + ((o->skb_data - o->skb_len) & (SKC_BLOCK - 1)), 8);
	payload = (long)len - (long)(head + th - data) - 8;
	if (payload <= 0)
		return;
	if (bpf_probe_read_kernel(b, FL_BLOCK, (void *)PARM2(ctx) + fl_daddr)) {
		tele_add(TELE_READ_FAULTS);
	} else {
		p.family = family;
		__builtin_memcpy(p.addr, b, 16); /* (v4: the first 4) */
		if (family == 4)
			__builtin_memset(p.addr + 4, 0, 12);
		__builtin_memcpy(&port, b + ((fl_dport - fl_daddr) & (FL_BLOCK - 1)), 2);
		p.port = swap16(port);
	}
	udp_count_sk((void *)sk, o, payload, 0, &p, 0);
}

SEC("kprobe/udp_send_skb")
int kp_udp_send_skb(struct pt_regs *ctx)
{
	udp_sent_skb(ctx, 4);
	return 0;
}

SEC("kprobe/udp_v6_send_skb")
int kp_udp_v6_send_skb(struct pt_regs *ctx)
{
	udp_sent_skb(ctx, 6);
	return 0;
}

/* skb_consume_udp(sk, skb, len): called by udp(v6)_recvmsg once the
 * datagram was copied, with the return value (negated for MSG_PEEK): one
 * kprobe per receive, and the datagram's own source for every recv(),
 * read() or recvmsg(), with or without an address. */
SEC("kprobe/skb_consume_udp")
int kp_skb_consume_udp(struct pt_regs *ctx)
{
	struct offsets *o = ready_offsets();
	int len = (int)PARM3(ctx);
	struct peer p;

	if (!o || len <= 0)
		return 0;
	__builtin_memset(&p, 0, sizeof(p));
	udp_count_sk((void *)PARM1(ctx), o, 0, len, &p, (void *)PARM2(ctx));
	return 0;
}
