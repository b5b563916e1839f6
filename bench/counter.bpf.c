/* counter.bpf.c: the hot-path floor of bench/run.py, a minimal hand-written
 * per-socket byte counter on the tracer's own byte hooks: hash[sk] += ret
 * on raw sock_send_length and sock_recv_length (MSG_PEEK skipped).  No
 * tuple, no process, no life: what any per-socket tracer must at least do.
 * Built by bench/run.py with clang -target bpf. */
typedef unsigned long long u64;
#define SEC(name) __attribute__((section(name), used))

struct bpf_map_def {
	unsigned int type, key_size, value_size, max_entries, map_flags;
};
struct bpf_map_def SEC("maps") counts = { 1 /* hash */, 8, 8, 65536, 0 };
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, u64 flags) = (void *)2;

struct raw_args {
	u64 args[3];
};

static inline __attribute__((always_inline)) int count(u64 sk, long ret)
{
	u64 *v;

	if (ret <= 0)
		return 0;
	v = bpf_map_lookup_elem(&counts, &sk);
	if (v) {
		__sync_fetch_and_add(v, ret);
	} else {
		u64 init = ret;
		bpf_map_update_elem(&counts, &sk, &init, 0);
	}
	return 0;
}

SEC("raw_tracepoint/sock_send_length")
int counter_send(struct raw_args *ctx)
{
	return count(ctx->args[0], (int)ctx->args[1]);
}

SEC("raw_tracepoint/sock_recv_length")
int counter_recv(struct raw_args *ctx)
{
	if ((int)ctx->args[2] & 2) /* MSG_PEEK */
		return 0;
	return count(ctx->args[0], (int)ctx->args[1]);
}

char _license[] SEC("license") = "GPL";
