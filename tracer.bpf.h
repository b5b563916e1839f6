/* tracer.bpf.h: the structs shared by the kernel side (tracer.bpf.c) and the
 * user side (abi.py mirrors every struct and constant here, under the same
 * names; test/test_layout.py checks each against this header).  No kernel headers: every
 * type used here is defined here. */
#ifndef TRACER_BPF_H
#define TRACER_BPF_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef long long __s64;

/* Legacy map definition, read by elfload.py from the "maps" section.
 * Python: abi.BPF_MAP_DEF. */
struct bpf_map_def {
	__u32 type;
	__u32 key_size;
	__u32 value_size;
	__u32 max_entries;
	__u32 map_flags;
};

#define SEC(name) __attribute__((section(name), used))
#define MAP(name, t, k, v, n) \
	struct bpf_map_def SEC("maps") name = { .type = t, .key_size = k, .value_size = v, .max_entries = n }

#define TRACER_PROTO_TCP 6
#define TRACER_PROTO_UDP 17

#define DIR_UNKNOWN 0
#define DIR_OUTGOING 1
#define DIR_INCOMING 2

#define CONN_OPEN 1
#define CONN_CLOSED 2

/* Key of the conns map and name of every record: one life of one
 * connection of one process.  52 bytes.  Python: abi.CONN_TUPLE. */
struct conn_tuple {
	__u8 saddr[16];   /* IPv4 in the first 4 bytes, network order */
	__u8 daddr[16];
	__u32 netns;      /* inode number of the network namespace */
	__u32 pid;        /* tgid; 0 = not yet known (incoming, not claimed) */
	__u16 sport;      /* host order */
	__u16 dport;      /* host order */
	__u8 family;      /* 4 or 6 */
	__u8 proto;       /* TRACER_PROTO_TCP or TRACER_PROTO_UDP */
	__u16 _pad;
	__u32 life;       /* TCP: which life of the socket (a number per connect or
			   * passive open); UDP: 0 */
};

/* Counters of one record: the value of the conns map, and inside a socks
 * entry for the socket's owner.  72 bytes.  Python: abi.CONN_STATS. */
struct conn_stats {
	__u64 sent_bytes;
	__u64 recv_bytes;
	__u64 first_ns;   /* bpf_ktime_get_ns() at the start of the life (or when first seen) */
	__u64 last_ns;    /* ... when last updated */
	__u32 retransmits; /* segments, as tcpi_total_retrans */
	__u8 direction;   /* DIR_* */
	__u8 state;       /* CONN_OPEN or CONN_CLOSED */
	__u8 seen_start;  /* 1: first_ns is the connection's start */
	__u8 end;         /* END_*: how a TCP connection ended (0: open, or not known) */
	char comm[16];    /* the process name (its main thread's) */
	__u32 gen;        /* the poll generation in which it was last put in dirty */
	__u32 rtt_us;     /* TCP: the smoothed RTT (srtt_us >> 3, as tcpi_rtt); 0: not read */
	__u32 rtt_var_us; /* TCP: its variance (mdev_us >> 2, as tcpi_rttvar) */
	__u32 _pad2;
};

/* conn_stats.end: how a TCP connection ended, at TCP_CLOSE */
#define END_NONE 0
#define END_FIN 1            /* both FINs (or a FIN state timed out) */
#define END_RESET_SENT 2     /* closed by us with a reset (unread data, SO_LINGER 0) */
#define END_RESET_RECEIVED 3 /* the peer reset it */
#define END_TIMEOUT 4        /* retransmits or keepalives timed out */
#define END_REFUSED 5        /* connect() refused (reset to the SYN) */
#define END_CONNECT_TIMEOUT 6 /* connect() timed out (no SYN-ACK) */
#define END_UNREACHABLE 7    /* connect() failed with an ICMP error (unreachable) */
#define END_ABORTED 8        /* closed before it was established, without an error */

/* Events (the events ring buffer; only when offsets.want has WANT_EVENTS) */
#define EV_CONNECT 1        /* outgoing TCP established */
#define EV_ACCEPT 2         /* incoming TCP, at its owner's accept or first use */
#define EV_CLOSE 3          /* TCP reached TCP_CLOSE after it was established */
#define EV_CONNECT_FAILED 4 /* TCP closed before it was established (end: why) */
#define EV_UDP_OPEN 5       /* a UDP flow's first datagram */

/* One event.  120 bytes.  Python: abi.CONN_EVENT. */
struct conn_event {
	__u64 ts_ns;      /* bpf_ktime_get_ns() */
	struct conn_tuple tuple;
	__u8 type;        /* EV_* */
	__u8 end;         /* END_* (EV_CLOSE, EV_CONNECT_FAILED) */
	__u8 direction;   /* DIR_* */
	__u8 seen_start;
	__u64 sent_bytes;
	__u64 recv_bytes;
	__u64 first_ns;   /* the connection's start (seen_start), or first seen */
	__u32 retransmits;
	__u32 rtt_us;
	__u32 rtt_var_us;
	__u32 _pad;
	char comm[16];
};

#define SOCK_OTHERS 3

/* Value of the socks map (key: struct sock address): one TCP socket's
 * current life, from connect or passive open until the kernel destroys the
 * socket.  The owner's counters live here (one lookup per send or
 * receive); other processes that use the socket (after fork) get conns
 * entries of their own, listed in others[] so they close with it.
 * A UDP socket's entry (tuple.proto UDP) holds the first flow (process,
 * peer) the socket carried, under a life number of its own, until it
 * idles out; others[0..1] then hold the socket's struct net pointer.
 * Python: abi.SOCK_INFO. */
struct sock_info {
	struct conn_tuple tuple;  /* captured while valid; pid = the owner */
	__u32 has_tuple;
	struct conn_stats stats;
	__u32 others[SOCK_OTHERS];
	__u32 seq_flags;  /* SEQ_*: which of the two below hold a baseline (kprobe backend) */
	__u32 write_seq;  /* tcp_sock's write_seq and copied_seq when bytes were last counted */
	__u32 copied_seq;
};

/* sock_info.seq_flags: the kprobe backend counts a TCP socket's bytes as
 * the moves of its sequence counters (write_seq: bytes queued by the
 * application; copied_seq: bytes read by it) since the last count */
#define SEQ_SEND 1 /* write_seq holds a baseline (cleared once the FIN is queued) */
#define SEQ_RECV 2 /* copied_seq holds a baseline */
#define SEQ_FIN 4  /* the peer's FIN came and was not read yet: reading it moves copied_seq by 1 */

/* A peer address taken from a message (unconnected UDP).  Python: abi.PEER. */
struct peer {
	__u8 addr[16];
	__u16 port;       /* host order */
	__u8 family;      /* 0 (none), 4 or 6 */
	__u8 _pad[5];
};

/* Value of the stash map (key: pid_tgid): what one thread's syscall or
 * probed function entry left for its later hook.  Python: abi.STASH. */
struct stash {
	__u64 sk;         /* kprobe: the sock argument; tracepoint: pending UDP receive */
	__u64 msg;        /* kprobe: struct msghdr * (kernel) */
	__u64 uaddr;      /* tracepoint: user sockaddr buffer of recvfrom/recvmsg */
	__s64 bytes;      /* tracepoint: pending UDP receive's length */
	__s64 flags;
	struct peer peer;
	__u8 has_peer;
	__u8 _pad[7];
	/* tracepoint: the peer of the thread's last addressed UDP send that
	 * succeeded, on socket sent_sk: the peer of the datagram that send
	 * left pending (MSG_MORE, UDP_CORK), which later calls append to
	 * without passing the cgroup hook */
	struct peer sent_to;
	__u64 sent_sk;
};

/* The guessed struct sock layout (offsets map, index 0).  Python:
 * abi.OFFSETS. */
struct offsets {
	__u32 ready;      /* 1 once guessing is done */
	__u32 ipv6;       /* 1 when the v6 offsets are valid */
	__u32 daddr;
	__u32 saddr;
	__u32 dport;
	__u32 sport;      /* skc_num: local port, host order */
	__u32 family;
	__u32 state;
	__u32 protocol;   /* sk_protocol (u16) */
	__u32 v6_daddr;
	__u32 v6_saddr;
	__u32 net;        /* skc_net: struct net * */
	__u32 netns_inum; /* offset of ns.inum inside struct net */
	__u32 gen;        /* poll generation: user space bumps it at each poll */
	__u32 task_comm;  /* struct task_struct: comm (0: unknown, use the thread's) */
	__u32 task_leader; /* struct task_struct: group_leader */
	__u32 skb_data;   /* struct sk_buff: data (0: unknown) */
	/* kprobe backend, UDP sends at udp_send_skb / udp_v6_send_skb (0: unknown) */
	__u32 skb_sk;     /* struct sk_buff: sk */
	__u32 skb_len;    /* struct sk_buff: len (u32); len, transport_header, head and data
			   * lie within SKC_BLOCK bytes from len (one probe read) */
	__u32 skb_head;   /* struct sk_buff: head */
	__u32 skb_thdr;   /* struct sk_buff: transport_header (u16, from head) */
	__u32 fl4_daddr;  /* struct flowi4: daddr; its fl4_dport lies within FL_BLOCK bytes after */
	__u32 fl4_dport;
	__u32 fl6_daddr;  /* struct flowi6: daddr, fl6_dport likewise */
	__u32 fl6_dport;
	__u32 sk_rcvq;    /* struct sock: sk_receive_queue (0: unknown) */
	__u32 udp_readerq; /* struct udp_sock: reader_queue (0: unknown) */
	/* filters, applied before anything is stored (0: no filter) */
	__u32 want;       /* WANT_* bits: what to trace */
	__u32 pid_filter; /* only this process (tgid) */
	__u32 port_filter; /* only connections with this local or remote port */
	__u32 skc_block;  /* 1: every tuple field lies in the first SKC_BLOCK bytes of
			   * struct sock, read with one probe read */
	__u32 sk_err;     /* struct sock: sk_err (int; 0: unknown) */
	__u32 srtt;       /* struct tcp_sock: srtt_us (0: unknown) */
	__u32 mdev;       /* struct tcp_sock: mdev_us (0: unknown) */
	__u32 inet_sport; /* struct inet_sock: inet_sport, network order (0: unknown) */
	__u32 write_seq;  /* struct tcp_sock: write_seq (0: unknown; the kprobe backend's) */
	__u32 copied_seq; /* struct tcp_sock: copied_seq (0: unknown) */
	__u32 rcv_nxt;    /* struct tcp_sock: rcv_nxt (0: unknown) */
	__u32 sent_seq;   /* struct tcp_sock: snd_nxt, snd_una or snd_sml (equal when idle; 0: unknown) */
};

#define SKC_BLOCK 128
/* per-CPU scratch (skc_copy): a block of struct sock with 16 bytes of
 * slack, or the 256 bytes of IPv6 extension headers a received datagram's
 * source is looked for behind, and its source address */
#define SCRATCH_BYTES 288
#define FL_BLOCK 64       /* the bytes of a flow read from its daddr */

#define WANT_TCP 1
#define WANT_UDP 2
#define WANT_V4 4
#define WANT_V6 8
#define WANT_EVENTS 16  /* push events into the events ring buffer */

/* The name a tracer gives its process while it guesses offsets
 * ("tracer:guessing", 16 bytes with the NUL, as two little-endian u64):
 * other tracers leave that process's new connections out. */
#define GUESS_COMM_LO 0x673a726563617274ULL
#define GUESS_COMM_HI 0x00676e6973736575ULL

/* guess_req map, index 0: what the guessing thread asks for.
 * Python: abi.GUESS_REQ. */
struct guess_req {
	__u64 pid_tgid;   /* only this thread's events are dumped */
	__u32 net_off;    /* when non-zero: also dump *(void **)(sk + net_off);
			   * GUESS_TASK_AT: the task_struct offset to follow */
	__u32 seq;        /* copied into the dump, to match request and answer */
	__u32 mode;       /* GUESS_SOCK, GUESS_TASK or GUESS_TASK_AT */
	__u32 state;      /* GUESS_STATE: the TCP state whose entry is dumped */
};

/* guess_req.mode: what the guess program dumps */
#define GUESS_SOCK 0      /* the struct sock (and its struct net) */
#define GUESS_TASK 1      /* the current task_struct, 4096 bytes over both areas */
#define GUESS_TASK_AT 2   /* the task_struct at *(current + net_off), likewise */
#define GUESS_SKB_AT 3    /* the sk_buff's bytes at *(skb + net_off) - GUESS_SKB_BEFORE */
#define GUESS_QSKB_AT 4   /* the same for the skb at the head of the queue at sk + (net_off & 0xffff),
			   * pointer at skb + (net_off >> 16) */
#define GUESS_STATE 5      /* the socket, 4096 bytes over both areas, as it enters state */
#define GUESS_SEND_SKB 6   /* udp_send_skb / udp_v6_send_skb: the sk_buff's first GUESS_CHUNK bytes,
			    * and the flow's (struct flowi4 / flowi6) in the second area */
#define GUESS_SKB_BEFORE 128

#define GUESS_SK_BYTES 2048
#define GUESS_NET_BYTES 2048
#define GUESS_CHUNK 512

/* guess_dump map, index 0: raw bytes of the struct sock (and struct net).
 * Python: abi.GUESS_DUMP. */
struct guess_dump {
	__u32 seq;
	__u32 sk_ok;      /* bitmask of GUESS_CHUNK chunks read without fault */
	__u32 net_ok;
	__u32 _pad;
	__u64 sk;         /* the struct sock address */
	__u8 sk_bytes[GUESS_SK_BYTES];
	__u8 net_bytes[GUESS_NET_BYTES];
};

/* telemetry map (array of __u64) indexes.  Python: abi.TELEMETRY_NAMES
 * (each name: the macro's, after TELE_, in lower case). */
#define TELE_CONN_LOST 0      /* TCP connection lives not tracked: socks map full */
#define TELE_CLOSED_LOST 1    /* ended lives or other processes' records the conns map could not hold */
#define TELE_STASH_LOST 2     /* per-thread stash map full */
#define TELE_TUPLE_MISMATCH 3 /* guessed offsets disagree with the tracepoint */
#define TELE_TUPLE_CHECKED 4  /* cross-checks made */
#define TELE_READ_FAULTS 5     /* bpf_probe_read_kernel failed */
#define TELE_PENDING_LOST 6   /* UDP receive whose peer address was not read */
#define TELE_DIRTY_LOST 7     /* dirty map full: the next full scan finds it */
#define TELE_BYTES_LOST 8     /* bytes sent or received that no record could hold */
#define TELE_UDP_LOST 9       /* UDP datagrams whose flow the conns map could not hold */
#define TELE_SHARED_OVERFLOW 10 /* a socket used by more processes than sock_info.others holds */
#define TELE_EVENTS_LOST 11   /* events the events ring buffer had no room for */
#define TELE_EVENTS 12        /* events pushed */
#define TELE_MAX 13

/* tp_fields map (array of __u32): field offsets of perf tracepoints,
 * read by user space from each tracepoint's format file.  Python: abi.TPF_*;
 * backends.TP_FIELDS says which field each slot holds. */
#define TPF_ISS_SKADDR 0
#define TPF_ISS_NEWSTATE 1
#define TPF_ISS_SPORT 2
#define TPF_ISS_DPORT 3
#define TPF_ISS_FAMILY 4
#define TPF_ISS_PROTOCOL 5
#define TPF_ISS_SADDR 6
#define TPF_ISS_DADDR 7
#define TPF_ISS_SADDR_V6 8
#define TPF_ISS_DADDR_V6 9
#define TPF_SENDTO_ADDR 10
#define TPF_SENDMSG_MSG 11
#define TPF_RECVFROM_ADDR 12
#define TPF_RECVMSG_MSG 13
#define TPF_SSL_SK 15         /* sock_send_length / sock_recv_length: sk */
#define TPF_SSL_RET 16
#define TPF_SSL_FLAGS 17
#define TPF_RETRANS_SKADDR 18
#define TPF_RETRANS_SKBADDR 19
#define TPF_ISS_OLDSTATE 20   /* inet_sock_set_state: oldstate */
#define TPF_MAX 24

#endif
