/* test/selftest.bpf.c: self-test programs for the loader and bpfsys tests
 * (test/), built by make into test/selftest.bpf.o, apart from the
 * production object.  They need no offsets: they count calls and bytes of
 * the current process into the maps below.
 *
 * Built with clang -target bpf and no kernel headers (see Makefile). */
#include "../tracer.bpf.h"

/* BPF ABI numbers (include/uapi/linux/bpf.h). */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_NOEXIST 1

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) = (void *)2;
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;

/* test_counts slots */
#define TEST_CONNECT_ENTRY 0
#define TEST_CONNECT_RETURN 1
#define TEST_SEND_CALLS 2

MAP(test_counts, BPF_MAP_TYPE_ARRAY, sizeof(__u32), sizeof(__u64), 4);
MAP(test_bytes, BPF_MAP_TYPE_HASH, sizeof(__u32), sizeof(__u64), 1024);

char _license[] SEC("license") = "GPL";
__u32 _version SEC("version") = 0xFFFFFFFE; /* ignored by kernels >= 5.0 */

/* struct bpf_raw_tracepoint_args */
struct raw_args {
	__u64 args[3];
};

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

static inline __attribute__((always_inline)) void test_count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&test_counts, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("kprobe/tcp_v4_connect")
int test_tcp_v4_connect(void *ctx)
{
	test_count(TEST_CONNECT_ENTRY);
	return 0;
}

SEC("kretprobe/tcp_v4_connect")
int test_tcp_v4_connect_ret(void *ctx)
{
	test_count(TEST_CONNECT_RETURN);
	return 0;
}
